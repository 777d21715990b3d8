"""Measuring tools: the speed benchmark, the fidelity harness and the proxy model they use.

They import the serving core (flux/) and are never imported by it or by the Cog adapter.
"""
