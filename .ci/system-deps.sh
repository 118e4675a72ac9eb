#!/usr/bin/env bash
# System (Debian bookworm) packages needed by the live-ingest test infrastructure
# in tests/live_servers.py:
#   * ffmpeg                      - publishers (RTMP push, live HLS writer)
#   * nginx + libnginx-mod-rtmp   - real RTMP server (module: /usr/lib/nginx/modules/ngx_rtmp_module.so)
#   * GStreamer RTSP server       - real RTSP server driven by tests/rtsp_server.py,
#                                   run with Debian's /usr/bin/python3 (python3-gi)
#   * chromium                    - headless browser for tests/test_hlsjs.py and the console's
#                                   tests/test_console.py (driven by Playwright from PyPI, no browser download)
#   * nodejs + npm                - `npm pack hls.js` for tests/test_hlsjs.py
#   * prometheus, systemd         - promtool, a real Prometheus, systemd-analyze (tests/test_deploy.py)
#   * postgresql-15               - the PostgreSQL store tests and the cluster test (tests/pg_server.py)
#
# Idempotent: when every package is already installed this exits without touching
# apt at all (no `apt-get update`), so reruns are fast.
# Needs root (or sudo). Usage: bash .ci/system-deps.sh
# SYSTEM_DEPS_DRY_RUN=1 only prints what it would install.
set -euo pipefail

PACKAGES=(
  ffmpeg
  nginx
  libnginx-mod-rtmp
  python3
  python3-gi
  gir1.2-glib-2.0
  gir1.2-gstreamer-1.0
  gir1.2-gst-plugins-base-1.0
  gir1.2-gst-rtsp-server-1.0
  libgstrtspserver-1.0-0
  gstreamer1.0-rtsp
  gstreamer1.0-tools
  gstreamer1.0-plugins-base   # videotestsrc, audiotestsrc, videoconvert, audioconvert
  gstreamer1.0-plugins-good   # rtph264pay, rtpmp4gpay, rtpmp4apay
  gstreamer1.0-plugins-bad    # h264parse
  gstreamer1.0-plugins-ugly   # x264enc
  gstreamer1.0-libav          # avenc_aac
  chromium                    # headless browser: tests/test_hlsjs.py (HLS plays in hls.js), tests/test_console.py
  curl                        # the README tour's API calls, run by tests/test_readme_tour.py
  prometheus                  # promtool + a real Prometheus for tests/test_deploy.py (deploy/ rules, dashboard)
  systemd                     # systemd-analyze verify of deploy/systemd/streamguard.service
  postgresql-15               # a real PostgreSQL for the store and cluster tests (initdb + postgres, run unprivileged)
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  # dpkg -s succeeds for half-removed packages too; require "install ok installed".
  status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
  if [[ "$status" != "install ok installed" ]]; then
    missing+=("$pkg")
  fi
done

# Node.js/npm: checked by command, not by package, because a machine may have
# them from elsewhere (NodeSource's nodejs bundles npm and conflicts with
# Debian's npm package); Debian's nodejs + npm are installed only when no npm runs.
if ! command -v "${NPM:-npm}" >/dev/null 2>&1; then
  missing+=(nodejs npm)
fi

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "system-deps: all ${#PACKAGES[@]} packages and npm already installed"
  exit 0
fi

if [[ "${SYSTEM_DEPS_DRY_RUN:-}" == 1 ]]; then  # for tests: say what would be installed
  echo "system-deps: would install: ${missing[*]}"
  exit 0
fi

echo "system-deps: installing: ${missing[*]}"

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
  SUDO=(sudo)
fi

# Never let package postinst scripts start services (nginx would grab :80).
# Docker images usually ship a policy-rc.d already; on plain VMs add a temporary one.
POLICY=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e "$POLICY" ]]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod 755 "$POLICY"
  created_policy=1
fi
cleanup() {
  if [[ $created_policy -eq 1 ]]; then
    "${SUDO[@]}" rm -f "$POLICY"
  fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y --no-install-recommends "${missing[@]}"

echo "system-deps: done"
