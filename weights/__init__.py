"""Shipped weights: the toy model (toy/), its judge and example adapters."""
