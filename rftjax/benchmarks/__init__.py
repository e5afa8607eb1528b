"""Performance benchmarks (`python -m launch.bench --what=...`): measurements, not tests."""
