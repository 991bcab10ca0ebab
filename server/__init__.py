"""Flower ServerApp of fedpatch (thin glue over fedpatch.federated)."""
