from celery import shared_task

from shop.models import Order


@shared_task(name="shop.ship", idempotency_key=("order_id",))
def ship(order_id: int) -> str:
    Order.objects.filter(id=order_id).update(status="shipped")
    return f"shipped {order_id}"
