"""Helpers the tests share: tiny CLIP models, seeded tensors, the literal released formulation."""
