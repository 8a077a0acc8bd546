"""Tests: edge."""
