#!/bin/sh
# Install (or update) smsapi on Debian, as README.md "Install on Debian" says:
#   sudo apt-get install -y smstools python3-waitress && sudo sh install.sh
# Safe to run again: files are replaced, the config is kept, the user made once.
# DESTDIR=/some/dir places the files under that directory only (no user, no systemctl).
set -eu
cd "$(dirname "$0")"
root=${DESTDIR:-}

if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run it as root: sudo sh install.sh" >&2
    exit 1
fi
group=root
if [ -z "$root" ]; then
    if ! getent group smsd >/dev/null; then
        echo "install.sh: no smsd group; install smsd first: apt-get install smstools" >&2
        exit 1
    fi
    python3 -c 'import waitress' 2>/dev/null ||
        echo "install.sh: python3-waitress is missing; smsapi will run on the slower wsgiref server" >&2
    if ! id smsapi >/dev/null 2>&1; then
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin smsapi
        echo "made the system user smsapi"
    fi
    # smsd's spool is group smsd; smsd itself runs as the group GROUP= in
    # /etc/default/smstools (Debian: dialout), which our files must get.
    smsd_group=$(sed -n 's/^GROUP="\{0,1\}\([A-Za-z0-9_.-]*\)"\{0,1\}$/\1/p' /etc/default/smstools 2>/dev/null | tail -n 1)
    usermod -a -G "smsd,${smsd_group:-dialout}" smsapi
    group=smsapi
    if [ -d /var/lib/smsapi ]; then  # a quick start run as root made it root's
        chown -R smsapi:smsapi /var/lib/smsapi
        echo "gave /var/lib/smsapi to the user smsapi"
    fi
fi

install -d -m 0755 "$root/usr/local/lib/smsapi" "$root/usr/local/share/doc/smsapi" \
    "$root/etc/systemd/system"
install -m 0644 smsapi.py "$root/usr/local/lib/smsapi/smsapi.py"
# The unit runs python3 -m smsapi: compiled here, once, not at every start.
/usr/bin/python3 -m compileall -q -d /usr/local/lib/smsapi "$root/usr/local/lib/smsapi"
install -m 0644 README.md "$root/usr/local/share/doc/smsapi/README.md"
install -m 0644 smsapi.service "$root/etc/systemd/system/smsapi.service"
# The config holds password hashes: readable by root and the service only.
install -d -m 0750 -g "$group" "$root/etc/smsapi"
if [ -e "$root/etc/smsapi/smsapi.ini" ]; then
    echo "kept $root/etc/smsapi/smsapi.ini"
else
    install -m 0640 -g "$group" smsapi.ini "$root/etc/smsapi/smsapi.ini"
    echo "installed $root/etc/smsapi/smsapi.ini"
fi
echo "next: add a user: sudo python3 /usr/local/lib/smsapi/smsapi.py add-user NAME --config /etc/smsapi/smsapi.ini"
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "next: start it: sudo systemctl enable --now smsapi (it reads config changes by itself)"
elif [ -z "$root" ]; then
    echo "systemd is not running here: start it by hand as its user:"
    echo "  cd /usr/local/lib/smsapi && sudo -u smsapi python3 -m smsapi --config /etc/smsapi/smsapi.ini"
fi
