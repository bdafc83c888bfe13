# What tests/test_dashboard_browser.py needs (put into .ci/run before the test command).
# Debian's Chromium, driven by Playwright for Python; `playwright install` is never run:
# the tests launch /usr/bin/chromium. fonts-noto-cjk renders the Korean node names.
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium fonts-noto-cjk
python -m pip install -q "playwright>=1.40"
test -x /usr/bin/chromium
python -c "import playwright.async_api"
