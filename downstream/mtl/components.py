"""Registries of the swappable components of the multi-task models: architectures, heads, loss balancers."""
from selfsup.registry import Registry

ARCHITECTURES = Registry("mtl architecture")
HEADS = Registry("dense head")
BALANCERS = Registry("loss balancer")
