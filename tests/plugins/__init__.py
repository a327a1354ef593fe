"""Tests of the strategy plugins: registry routes, the zoo, its conformance harness."""
