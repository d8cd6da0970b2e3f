"""The engine layer (labkit's containerd and dockerd): images and many containers."""
