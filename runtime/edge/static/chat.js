"use strict";
const $ = (id) => document.getElementById(id);
let conversationId = null;

function text(tag, value, cls) {
  const el = document.createElement(tag);
  el.textContent = value;
  if (cls) el.className = cls;
  return el;
}

function mb(bytes) { return (bytes / 1048576).toFixed(0) + " MB"; }

function why(answer) {
  const d = answer.decision || {};
  const reasons = (d.reasons || []).map((r) => r.code + (r.detail ? " (" + r.detail + ")" : "")).join("; ");
  const conf = typeof d.confidence === "number" ? "confidence " + d.confidence.toFixed(2) + " — " : "";
  const src = (answer.sources || []).map((s) => s.title || s.doc_id).filter(Boolean);
  return conf + reasons + (src.length ? " — sources: " + [...new Set(src)].join(", ") : "");
}

function render(question, answer) {
  const box = document.createElement("div");
  box.className = "msg";
  box.appendChild(text("div", question, "q"));
  const badge = text("span", answer.source === "core" ? "core" : answer.source, "badge " + answer.source);
  const body = text("div", answer.answer || "(no answer)", "a " + answer.source);
  const meta = text("div", "", "why");
  meta.appendChild(badge);
  meta.appendChild(document.createTextNode(" " + why(answer)));
  box.appendChild(body);
  box.appendChild(meta);
  if (answer.escalation && answer.escalation.status !== "delivered" && answer.source !== "core") {
    const pending = text("div", "Escalated to the core: " + answer.escalation.status + "; the local answer is shown meanwhile.", "why");
    box.appendChild(pending);
    poll(answer.escalation.id, body, badge, pending);
  }
  $("log").appendChild(box);
  $("log").scrollTop = $("log").scrollHeight;
}

async function poll(id, body, badge, pending) {
  for (let i = 0; i < 600; i++) {
    await new Promise((r) => setTimeout(r, 2000));
    const res = await fetch("/api/escalations/" + encodeURIComponent(id));
    if (!res.ok) return;
    const e = await res.json();
    if (e.status === "delivered" && e.answer) {
      body.textContent = e.answer;
      body.className = "a core";
      badge.textContent = "core";
      badge.className = "badge core";
      pending.textContent = "Answered by the core after the escalation was delivered.";
      return;
    }
    if (e.status === "rejected") { pending.textContent = "The core refused the escalation: " + (e.last_error || ""); return; }
    pending.textContent = "Escalated to the core: " + e.status + " (" + e.attempts + " attempts); the local answer is shown meanwhile.";
  }
}

function numberOrNull(id) { const v = $(id).value; return v === "" ? null : Number(v); }

$("ask").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  $("send").disabled = true;
  const payload = {
    question, conversation_id: conversationId, model: $("model").value || null,
    temperature: numberOrNull("temperature"), top_p: numberOrNull("top_p"),
    max_tokens: numberOrNull("max_tokens"), presence_penalty: numberOrNull("presence_penalty"),
    share: $("share").checked,
  };
  try {
    const res = await fetch("/api/ask", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(payload) });
    const data = await res.json();
    if (!res.ok) { render(question, { answer: (data.error || {}).message || "error", source: "local", decision: {} }); return; }
    conversationId = data.conversation_id;
    render(question, data);
    $("question").value = "";
  } finally {
    $("send").disabled = false;
  }
});

$("upload").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const file = $("file").files[0];
  if (!file) { $("upload-status").textContent = "Choose a TXT, MD or PDF file first."; return; }
  const form = new FormData();
  form.append("file", file);
  form.append("local_only", $("local_only").checked ? "true" : "false");
  $("upload-status").textContent = "Uploading…";
  const res = await fetch("/api/documents", { method: "POST", body: form });
  const data = await res.json();
  $("upload-status").textContent = res.ok ? "Added " + data.doc_id + " (" + data.chunks + " chunks" + (data.local_only ? ", local only" : "") + ")" : (data.error || {}).message;
  refreshStatus();
});

async function refreshStatus() {
  const res = await fetch("/api/status");
  if (!res.ok) return;
  const s = await res.json();
  $("device").textContent = s.device + " · " + s.profile + " · " + s.departments.join(", ");
  const select = $("model");
  if (!select.options.length) {
    for (const m of s.models) select.appendChild(new Option(m, m));
    $("temperature").value = s.sampling.temperature;
    $("top_p").value = s.sampling.top_p;
    $("max_tokens").value = s.sampling.max_tokens;
    $("presence_penalty").value = s.sampling.presence_penalty;
  }
  $("knowledge").textContent = "Knowledge: " + s.knowledge.chunks + " chunks in " + s.knowledge.documents + " documents";
  $("outbox").textContent = "Escalations waiting: " + (s.outbox.pending || 0);
}

async function refreshMonitor() {
  const res = await fetch("/api/monitor");
  if (!res.ok) return;
  const m = await res.json();
  $("cpu-bar").style.width = Math.min(100, m.cpu_percent) + "%";
  $("cpu-text").textContent = m.cpu_percent.toFixed(0) + "%";
  $("ram-bar").style.width = (100 * m.ram_used_bytes / m.ram_total_bytes).toFixed(0) + "%";
  $("ram-text").textContent = mb(m.ram_used_bytes) + " / " + mb(m.ram_total_bytes) + " (agent " + mb(m.agent_rss_bytes) + ")";
}

refreshStatus();
refreshMonitor();
setInterval(refreshMonitor, 2000);
setInterval(refreshStatus, 10000);
