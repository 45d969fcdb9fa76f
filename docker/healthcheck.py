"""Container health probe: exit 0 when GET /health answers 200, else 1 (stdlib only, no curl needed).

/health answers 503 while the model loads and while the server drains, so a replica is marked healthy
only once it can serve. The port is STREAMLLM_PORT (default 8000), or the first argument.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    port = argv[1] if len(argv) > 1 else os.environ.get("STREAMLLM_PORT", "8000")
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as e:
        print(f"{url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
