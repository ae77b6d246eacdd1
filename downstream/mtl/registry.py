"""Registries of the swappable parts of the multi-task models."""
from selfsup.registry import Registry

ARCHITECTURES = Registry("mtl architecture")
HEADS = Registry("dense head")
BALANCERS = Registry("loss balancer")
