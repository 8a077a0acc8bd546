"""Tests: ledgers."""
