"""A pretend sensor for the example fleet: appends a reading to readings.log every few seconds."""

import argparse
import random
import signal
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--every", type=float, default=5.0)
parser.add_argument("--unit", default="C")
args = parser.parse_args()
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    with open("readings.log", "a") as f:
        f.write(f"{time.time():.0f} {20 + random.random() * 5:.2f}{args.unit}\n")
    time.sleep(args.every)
