"""Performance and reliability benchmarks, measured side by side in one process.

Each module holds one family: a function that measures and returns figures (a dict), and a
`report` that turns them into lines. `python -m launch.bench --what=NAME` parses the flags and
calls them.
"""
