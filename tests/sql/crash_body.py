"""A worker process for test_crash: runs one attempt's body against a database, then blocks
(standing for the time before the Redis completion) until the test SIGKILLs it.

Usage: python crash_body.py URL TOKEN atomic|plain
"""

from __future__ import annotations

import sys
import time

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from idemtask import context
from idemtask.sql import atomic

from sql_support import as_attempt, payments


def main(url: str, token: int, mode: str) -> None:
    engine = create_engine(url)
    context.activate(as_attempt(token))
    with Session(engine) as session:
        if mode == "atomic":
            with atomic(session) as effect:
                if not effect.replayed:
                    session.execute(payments.insert().values(ref=f"by-{token}"))
                    effect.value = token
        else:
            session.execute(payments.insert().values(ref=f"by-{token}"))
            session.commit()
    print("committed", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
