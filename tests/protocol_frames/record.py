"""Record a new frame: python tests/protocol_frames/record.py NAME '<python literal>' [request]."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

from fetchml.protocol import encode

HERE = Path(__file__).parent


def to_json(value: object) -> object:
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


def main() -> None:
    name, literal = sys.argv[1], sys.argv[2]
    is_request = len(sys.argv) > 3 and sys.argv[3] == "request"
    value = ast.literal_eval(literal)
    index_path = HERE / "frames.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    if name in index:
        sys.exit(f"{name} is already recorded; recorded frames never change")
    (HERE / f"{name}.msgpack").write_bytes(encode(value))
    index[name] = {"value": to_json(value), "request": is_request}
    index_path.write_text(json.dumps(index, indent=1) + "\n")


if __name__ == "__main__":
    main()
