"""The kernel layer: one module per primitive a container is made of."""
