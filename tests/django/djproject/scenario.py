"""One transaction of the test, run in its own process: ``python -m djproject.scenario
commit|rollback ORDER_ID``. Prints one JSON line: whether the store held the call's record
before the transaction ended, after it, and the key."""

import json
import sys

import django

django.setup()

from django.db import transaction  # noqa: E402
from shop.models import Order  # noqa: E402
from shop.tasks import ship  # noqa: E402

import idemtask  # noqa: E402


class RolledBack(Exception):
    pass


def main(outcome: str, order_id: int) -> None:
    key = ship.idemtask_key((order_id,)).key
    seen = {"key": key}
    try:
        with transaction.atomic():
            Order.objects.create(id=order_id, status="new")
            ship.delay_on_commit(order_id)
            seen["inside"] = idemtask.inspect(key) is not None
            if outcome == "rollback":
                raise RolledBack
    except RolledBack:
        pass
    seen["after"] = idemtask.inspect(key) is not None
    seen["orders"] = Order.objects.filter(id=order_id).count()
    print(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
