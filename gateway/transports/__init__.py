"""Thin encoders of the generation event log, one module per wire format."""
