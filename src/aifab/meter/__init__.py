"""Metering: energy samplers, prices, and the ledger. meter/ imports only store/."""
