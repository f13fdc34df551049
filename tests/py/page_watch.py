"""Watches the status page in a live Chromium over the DevTools protocol.

    python3 page_watch.py DEVTOOLS_PORT

Every 50 ms it counts the rows of the page's node table; each time the
count changes it prints `<rows> <unix ms>`. Runs until killed.
"""
import json
import sys
import time
import urllib.request

import websocket


def page_socket(port):
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit("no page target in Chromium")


def main():
    ws = websocket.create_connection(page_socket(sys.argv[1]), suppress_origin=True)
    expr = "document.querySelectorAll('#nodes tr').length"
    last, i = None, 0
    while True:
        i += 1
        ws.send(json.dumps({
            "id": i,
            "method": "Runtime.evaluate",
            "params": {"expression": expr, "returnByValue": True},
        }))
        while True:
            msg = json.loads(ws.recv())
            if msg.get("id") == i:
                break
        rows = msg.get("result", {}).get("result", {}).get("value")
        if rows != last:
            print(f"{rows} {int(time.time() * 1000)}", flush=True)
            last = rows
        time.sleep(0.05)


if __name__ == "__main__":
    main()
