// The dashboard's enrollment form: an operator creates a one-time token for a farm proxy.
// Shown only where the sidecar serves enrollment (--enroll-ca); token creation needs an
// operator certificate on a port with --http-require-operator (see bridge/web/enroll.py).
"use strict";

(function () {
  const el = (id) => document.getElementById(id);
  const TOKENS = "/api/v1/enroll/tokens";

  function show(id, visible) { el(id).hidden = !visible; }

  async function permission() {
    let answer;
    try {
      answer = await fetch(TOKENS, { headers: { Accept: "application/json" } });
    } catch (error) {
      return;  // the dashboard's own connection state says what is wrong
    }
    if (answer.status === 404) return;  // no enrollment on this port
    const body = await answer.json().catch(() => ({}));
    show("enroll", true);
    if (answer.ok && body.allowed) {
      el("enroll-operator").textContent = `as operator ${body.operator}`;
      show("enroll-form", true);
    } else {
      el("enroll-reason").textContent = body.reason || body.error || `HTTP ${answer.status}`;
      show("enroll-reason", true);
    }
  }

  async function create(event) {
    event.preventDefault();
    show("enroll-error", false);
    const name = el("enroll-name").value.trim();
    const accounts = el("enroll-accounts").value.split(/[\s,]+/).filter(Boolean);
    const request = { name, accounts, ttl: el("enroll-ttl").value.trim() };
    el("enroll-create").disabled = true;
    try {
      const answer = await fetch(TOKENS, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(request),
      });
      const body = await answer.json().catch(() => ({ error: `HTTP ${answer.status}` }));
      if (!answer.ok) throw new Error(body.error || `HTTP ${answer.status}`);
      el("enroll-result-name").textContent = body.name;
      el("enroll-result-accounts").textContent = body.accounts.join(", ");
      el("enroll-result-expires").textContent = new Date(body.expires).toISOString().replace(".000Z", "Z");
      el("enroll-token").textContent = body.token;
      el("enroll-fingerprint").textContent = body.fingerprint;
      el("enroll-command").textContent =
        `stratumrm proxy enroll ${location.origin} --token ${body.token} --fingerprint ${body.fingerprint} ` +
        `--out ${body.name}.bundle.pem`;
      show("enroll-result", true);
    } catch (error) {
      el("enroll-error").textContent = `No token created: ${error.message}`;
      show("enroll-error", true);
    } finally {
      el("enroll-create").disabled = false;
    }
  }

  el("enroll-form").addEventListener("submit", create);
  permission();
})();
