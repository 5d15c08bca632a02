"""The cost of one ``idemtask.sql.atomic`` block per task against a plain transaction doing
the same insert, on a SQLite file, alternated in one run so both share the machine's noise.

Run: ``python -m benchmarks.sql_effects [--tasks N]``; prints medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import Column, Engine, Integer, MetaData, Table, Text, create_engine
from sqlalchemy.orm import Session

from idemtask import context
from idemtask.context import Execution
from idemtask.sql import atomic, metadata

user_md = MetaData()
rows = Table("bench_rows", user_md, Column("id", Integer, primary_key=True), Column("ref", Text))


def _plain(engine: Engine, i: int) -> float:
    start = time.perf_counter()
    with Session(engine) as session, session.begin():
        session.execute(rows.insert().values(ref=f"plain-{i}"))
    return time.perf_counter() - start


def _atomic(engine: Engine, i: int) -> float:
    execution = Execution(f"k{i}", "bench.task", "t", "a", 1, takeover=False)
    token = context.activate(execution)
    try:
        start = time.perf_counter()
        with Session(engine) as session, atomic(session) as effect:
            if not effect.replayed:
                session.execute(rows.insert().values(ref=f"atomic-{i}"))
                effect.value = i
        return time.perf_counter() - start
    finally:
        context.deactivate(token)


def measure(tasks: int, directory: Path) -> dict[str, float]:
    engine = create_engine(f"sqlite:///{directory / 'bench.sqlite'}")
    metadata.create_all(engine)
    user_md.create_all(engine)
    plain: list[float] = []
    guarded: list[float] = []
    for i in range(tasks):
        plain.append(_plain(engine, i))
        guarded.append(_atomic(engine, i))
    engine.dispose()
    p, a = statistics.median(plain), statistics.median(guarded)
    return {"plain_us": p * 1e6, "atomic_us": a * 1e6, "ratio": a / p}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.tasks, Path(tmp))
    print(
        f"SQLite file, {args.tasks} tasks: plain transaction {result['plain_us']:.0f} µs, "
        f"atomic block {result['atomic_us']:.0f} µs, ratio {result['ratio']:.2f}×"
    )


if __name__ == "__main__":
    main()
