"""Helpers of the Cog adapter (predict.py) that exist only because it runs inside Cog's server."""
