"""Flower ClientApp of fedpatch (thin glue over fedpatch.federated)."""
