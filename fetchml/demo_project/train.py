"""A tiny pure-Python training run: fit y = 3x + 2 by gradient descent.

Reads --lr and --epochs, prints the loss as it goes, appends it to $FETCHML_METRICS_FILE (one
JSON line per epoch: `fetchml metrics` and `fetchml tui` show them), and writes the fitted
model to $FETCHML_OUTPUT_DIR/model.json (fetchml keeps that directory as the job's outputs).
"""

import argparse
import json
import os
import random
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    rng = random.Random(0)
    data = [(x / 100, 3 * x / 100 + 2 + rng.gauss(0, 0.05)) for x in range(100)]
    w = b = 0.0
    metrics_path = os.environ.get("FETCHML_METRICS_FILE")
    metrics = open(metrics_path, "a") if metrics_path else None  # noqa: SIM115
    for epoch in range(1, args.epochs + 1):
        grad_w = grad_b = loss = 0.0
        for x, y in data:
            err = w * x + b - y
            loss += err * err / len(data)
            grad_w += 2 * err * x / len(data)
            grad_b += 2 * err / len(data)
        w -= args.lr * grad_w
        b -= args.lr * grad_b
        print(f"epoch {epoch:3d}  loss {loss:.4f}  w {w:.3f}  b {b:.3f}", flush=True)
        if metrics is not None:
            metrics.write(json.dumps({"step": epoch, "loss": loss, "w": w, "b": b}) + "\n")
            metrics.flush()
        time.sleep(0.05)
    out = os.environ.get("FETCHML_OUTPUT_DIR", ".")
    with open(os.path.join(out, "model.json"), "w") as handle:
        json.dump({"w": w, "b": b, "lr": args.lr, "final_loss": loss}, handle, indent=2)
    print(f"saved model.json (w={w:.3f}, b={b:.3f})")


if __name__ == "__main__":
    main()
