"""Benchmarks that answer "what does the guard cost, and is it slower than what I use now".

Run them with ``python -m benchmarks`` (``--quick`` for a short run); see
``docs/benchmarks.md`` for what each figure means and the targets they are held to. Every
server they use is a throwaway ``redis-server`` on a free loopback port.
"""
