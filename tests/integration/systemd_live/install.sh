#!/bin/sh
# Runs in the new Debian root (mmdebstrap's customize hook, chroot) before its first boot:
# installs hmmirror and deploy/'s units as deploy/README.md says, then the live checks' users,
# policy, configuration and oneshot unit. /hmm-stage holds what the host test staged: wheels/
# (hmmirror's own), deps/ (the locked third-party packages, installed by uv from uv.lock's
# hashes), deploy/, and the check scripts.
set -eu
S=/hmm-stage

# hmmirror in a venv (Debian's python3 is externally managed: PEP 668).
python3 -m venv /opt/hmmirror
cp -a "$S"/deps/. /opt/hmmirror/lib/python3.11/site-packages/
rm -rf /opt/hmmirror/lib/python3.11/site-packages/bin
/opt/hmmirror/bin/pip install --quiet --no-index --no-deps --disable-pip-version-check "$S"/wheels/*.whl
/opt/hmmirror/bin/pip check --disable-pip-version-check
ln -s /opt/hmmirror/bin/hmmd /opt/hmmirror/bin/hmmctl /opt/hmmirror/bin/hm-agent /usr/local/bin/

# deploy/README.md's install.
install -D -m 0644 "$S"/deploy/hmmirror.sysusers /usr/lib/sysusers.d/hmmirror.conf
install -D -m 0644 "$S"/deploy/hmmirror.tmpfiles /usr/lib/tmpfiles.d/hmmirror.conf
systemd-sysusers hmmirror.conf && systemd-tmpfiles --create hmmirror.conf
install -m 0640 -g hmmirror "$S"/deploy/hmmd.toml /etc/hmmirror/hmmd.toml
install -D -m 0644 "$S"/README.md /usr/share/doc/hmmirror/README.md
install -m 0644 "$S"/deploy/hmmd.service "$S"/deploy/hmmd@.service "$S"/deploy/hm-agent@.service \
    /etc/systemd/system/
systemctl enable hmmd.service

# The checks: a target user, a granted agent user, a stranger; all may reach the socket.
for u in hmm-target:2001 hmm-agent:2002 hmm-stranger:2003; do
    name=${u%:*} id=${u#*:}
    groupadd --gid "$id" "$name"
    useradd --uid "$id" --gid "$id" --groups hmmirror --no-create-home --shell /usr/sbin/nologin "$name"
    printf '#!/bin/sh\nexec setpriv --reuid=%s --regid=%s --init-groups --inh-caps=-all -- /opt/hmmirror/bin/python "$@"\n' \
        "$name" "$name" > "$S/as-$name"
    chmod 0755 "$S/as-$name"
done
agent_uid=$(id -u hmmirror-agent)
cat > /etc/hmmirror/policy.toml <<POLICY
# hmm-agent (2002) and hm-agent@'s user may read and write hmm-target's (2001) processes.
[[grant]]
agents = ["uid:2002", "uid:$agent_uid"]
uids = [2001]
access = ["read", "write"]
POLICY
chmod 0644 /etc/hmmirror/policy.toml
# The sample configuration, with the policy, injection allowed, and a proc watcher so slow
# (5 s) that an invalidation within a second can only have come through a userfaultfd.
sed -i -e 's|^policy = .*|policy = "/etc/hmmirror/policy.toml"|' \
       -e 's|^uffd = .*|uffd = "inject"|' \
       -e 's|^poll_min = .*|poll_min = "5s"|' -e 's|^poll_max = .*|poll_max = "5s"|' \
       /etc/hmmirror/hmmd.toml
/opt/hmmirror/bin/hmmd --config /etc/hmmirror/hmmd.toml check-config

chmod 0755 "$S" && chmod 0644 "$S"/agent.py "$S"/checks.py
install -m 0644 "$S"/hmm-live-checks.service /etc/systemd/system/
systemctl enable hmm-live-checks.service
mkdir -p /hmm-live
