"""Pydantic contracts: every API body and every workflow and activity input and output."""
