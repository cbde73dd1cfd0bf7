"""Submits the shop's works and prints their results.

    python producer.py [--frontend 127.0.0.1:7000]
"""

import argparse
import sys

import dworkers
from shop.jobs import checksum, notify, price


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frontend", default="127.0.0.1:7000")
    args = parser.parse_args()
    client = dworkers.connect(args.frontend)  # the client job.submit(...) uses

    order = [{"quantity": 2, "unit_price": 9.5}, {"quantity": 1, "unit_price": 20.0}]
    print("price:", price.submit(order, coupon="TENOFF").result(timeout=30))
    print("checksum:", client.submit("checksum", payload=b"hello").result(timeout=30))
    print("notify:", notify.submit("ada").result(timeout=30))

    # Many works from one thread: submissions are pipelined, results come as they finish.
    handles = [price.submit([{"quantity": n, "unit_price": 1.0}]) for n in range(1, 101)]
    totals = sorted(h.result()["total"] for h in client.as_completed(handles, timeout=60))
    print("prices of 100 orders:", totals[0], "...", totals[-1], "sum", sum(totals))

    try:
        price.submit([{"quantity": -1, "unit_price": 5.0}], max_attempts=1).result(timeout=30)
    except dworkers.WorkFailed as failed:
        print("refused order:", failed.error.splitlines()[0])  # then its traceback
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
