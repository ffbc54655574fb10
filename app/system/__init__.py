"""Operator endpoints: health, liveness and readiness."""
