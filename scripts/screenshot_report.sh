#!/usr/bin/env bash
# Render a higanbana HTML report in headless Chromium and save a screenshot.
#
#   scripts/screenshot_report.sh REPORT.html OUT.png [WIDTH,HEIGHT]
#
# Needs Chromium (Debian: apt-get install chromium). A synthetic demo report to try it on:
#   .venv/bin/python -m higanbana.evaluate.report /tmp/demo && scripts/screenshot_report.sh /tmp/demo/report.html shot.png
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
    echo "usage: $0 REPORT.html OUT.png [WIDTH,HEIGHT]" >&2
    exit 2
fi
report=$1
out=$2
size=${3:-1280,2000}

if [[ ! -f "$report" ]]; then
    echo "error: no such report: $report" >&2
    exit 2
fi

browser=""
for name in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$name" >/dev/null 2>&1; then
        browser=$(command -v "$name")
        break
    fi
done
if [[ -z "$browser" ]]; then
    echo "error: no headless browser found (tried chromium, chromium-browser, google-chrome);" \
        "install one, e.g. 'apt-get install chromium' on Debian" >&2
    exit 3
fi

abs_report=$(cd "$(dirname "$report")" && pwd)/$(basename "$report")
mkdir -p "$(dirname "$out")"
abs_out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
rm -f "$abs_out"

# A throw-away profile keeps runs independent; --no-sandbox is needed when running as root (CI, containers).
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$profile" \
    --screenshot="$abs_out" --window-size="$size" "file://$abs_report" >/dev/null 2>&1 || true

if [[ ! -s "$abs_out" ]]; then
    echo "error: $browser wrote no screenshot to $abs_out" >&2
    exit 1
fi
echo "$abs_out"
