"""FLUX.1 Kontext [dev] image editing with TaylorSeer step caching."""
