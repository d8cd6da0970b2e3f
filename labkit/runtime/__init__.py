"""The runtime layer (labkit's runc): one container from a spec."""
