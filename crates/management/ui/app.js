// Warren's management UI: plain JavaScript over the management API (no
// build step, no network at build time). Credentials stay in the tab's
// sessionStorage and go out as HTTP Basic on each API call.
"use strict";

const main = document.getElementById("main");
const errorBox = document.getElementById("error");
let credentials = sessionStorage.getItem("warren-credentials");
let timer = null;
// Samples for the overview chart: [time, ready, unacked].
const depthHistory = [];

function esc(text) {
  return String(text ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
function seg(text) { return encodeURIComponent(text); }
function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = !message;
}

async function api(method, path, body) {
  const response = await fetch("/api" + path, {
    method,
    headers: { "Authorization": "Basic " + credentials, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) {
    const reason = (await response.json().catch(() => ({}))).reason || "not authorised";
    if (path === "/whoami") throw new Error("Login failed: " + reason);
    throw new Error(reason);
  }
  if (!response.ok) {
    const problem = await response.json().catch(() => ({}));
    throw new Error(`${response.status} ${problem.reason || problem.error || response.statusText}`);
  }
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

function loginPage() {
  document.getElementById("nav").hidden = true;
  document.getElementById("who").textContent = "";
  main.innerHTML = `<h1>Log in</h1>
    <form id="login"><label>Username <input name="user" autocomplete="username" required></label>
    <label>Password <input name="password" type="password" autocomplete="current-password"></label>
    <button>Log in</button></form>`;
  document.getElementById("login").onsubmit = async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    credentials = btoa(form.get("user") + ":" + form.get("password"));
    try {
      await api("GET", "/whoami");
      sessionStorage.setItem("warren-credentials", credentials);
      showError("");
      location.hash = "#/";
      route();
    } catch (error) {
      credentials = null;
      showError(error.message);
    }
  };
}

function table(columns, rows, empty) {
  if (!rows.length) return `<p>${esc(empty)}</p>`;
  const head = columns.map((c) => `<th class="${c.num ? "num" : ""}">${esc(c.title)}</th>`).join("");
  const body = rows.map((row) => "<tr>" + columns.map((c) =>
    `<td class="${c.num ? "num" : ""}">${c.html ? c.html(row) : esc(c.value(row))}</td>`).join("") + "</tr>").join("");
  return `<table><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>`;
}

function rate(details) { return details && details.rate !== undefined ? details.rate.toFixed(1) + "/s" : ""; }

// Lines of samples [time, a, b, ...], one colour per series, on a shared scale.
function drawChart(canvas, history = depthHistory, colors = ["#2563eb", "#d97706"]) {
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (history.length < 2) return;
  const max = Math.max(1, ...history.flatMap((sample) => sample.slice(1)));
  const x = (i) => (i / (history.length - 1)) * (canvas.width - 10) + 5;
  const y = (v) => canvas.height - 5 - (v / max) * (canvas.height - 10);
  colors.forEach((color, series) => {
    context.strokeStyle = color;
    context.beginPath();
    history.forEach((sample, i) => (i ? context.lineTo(x(i), y(sample[series + 1])) : context.moveTo(x(i), y(sample[series + 1]))));
    context.stroke();
  });
}

async function overviewPage() {
  const [overview, nodes] = await Promise.all([api("GET", "/overview"), api("GET", "/nodes").catch(() => [])]);
  const totals = overview.object_totals, queued = overview.queue_totals, stats = overview.message_stats || {};
  depthHistory.push([Date.now(), queued.messages_ready, queued.messages_unacknowledged]);
  if (depthHistory.length > 120) depthHistory.shift();
  const node = nodes[0];
  main.innerHTML = `<h1>Overview</h1>
    <p>${esc(overview.product_name)} ${esc(overview.product_version)} on ${esc(overview.node)}</p>
    <div class="cards">
      ${["connections", "channels", "exchanges", "queues", "consumers"].map((k) =>
        `<div class="card" id="total-${k}">${k}<b>${totals[k]}</b></div>`).join("")}
    </div>
    <h2>Queued messages</h2>
    <div class="cards">
      <div class="card">ready<b id="ready">${queued.messages_ready}</b></div>
      <div class="card">unacked<b id="unacked">${queued.messages_unacknowledged}</b></div>
      <div class="card">total<b>${queued.messages}</b></div>
    </div>
    <canvas id="chart" width="600" height="150" aria-label="ready (blue) and unacked (orange) over time"></canvas>
    <h2>Message rates</h2>
    <div class="cards">
      <div class="card">publish<b>${rate(stats.publish_details)}</b></div>
      <div class="card">deliver / get<b>${rate(stats.deliver_get_details)}</b></div>
      <div class="card">ack<b>${rate(stats.ack_details)}</b></div>
      <div class="card">unroutable<b>${rate(stats.drop_unroutable_details)}</b></div>
    </div>
    ${node ? `<h2>Node</h2><p>memory ${(node.mem_used / 1048576).toFixed(1)} MiB of ${(node.mem_limit / 1048576).toFixed(0)} MiB
      ${node.mem_alarm ? '<span class="alarm">memory alarm</span>' : ""}; disk free ${(node.disk_free / 1073741824).toFixed(1)} GiB
      ${node.disk_free_alarm ? '<span class="alarm">disk alarm</span>' : ""}</p>` : ""}
    <h2>Listeners</h2>
    ${table([{ title: "protocol", value: (l) => l.protocol }, { title: "address", value: (l) => l.ip_address }, { title: "port", value: (l) => l.port, num: true }], overview.listeners, "none")}`;
  drawChart(document.getElementById("chart"), depthHistory.map(([t, r, u]) => [t, r, u]));
  timer = setTimeout(refresh, 5000);
}

let queueQuery = { page: 1, size: 100, sort: "name", reverse: false, name: "" };

async function queuesPage() {
  const params = new URLSearchParams({ page: queueQuery.page, page_size: queueQuery.size, sort: queueQuery.sort, sort_reverse: queueQuery.reverse, name: queueQuery.name });
  const [page, vhosts] = await Promise.all([api("GET", "/queues?" + params), api("GET", "/vhosts")]);
  main.innerHTML = `<h1>Queues</h1>
    <form id="filter"><label>Filter by name <input name="name" value="${esc(queueQuery.name)}"></label>
      <label>Per page <select name="size">${[100, 500].map((n) => `<option ${n === queueQuery.size ? "selected" : ""}>${n}</option>`).join("")}</select></label>
      <button>Filter</button>
      <span>${page.filtered_count} of ${page.total_count} queues, page ${page.page} of ${Math.max(1, page.page_count)}</span>
      <button type="button" id="previous" ${page.page <= 1 ? "disabled" : ""}>Previous</button>
      <button type="button" id="next" ${page.page >= page.page_count ? "disabled" : ""}>Next</button></form>
    <div id="queue-table">${table([
      { title: "vhost", value: (q) => q.vhost, sort: "vhost" },
      { title: "name", html: (q) => `<a href="#/queues/${seg(q.vhost)}/${seg(q.name)}">${esc(q.name)}</a>`, sort: "name" },
      { title: "type", value: (q) => q.type },
      { title: "ready", value: (q) => q.messages_ready, num: true, sort: "messages_ready" },
      { title: "unacked", value: (q) => q.messages_unacknowledged, num: true, sort: "messages_unacknowledged" },
      { title: "total", value: (q) => q.messages, num: true, sort: "messages" },
      { title: "incoming", value: (q) => rate(q.message_stats.publish_details), num: true },
      { title: "deliver / get", value: (q) => rate(q.message_stats.deliver_get_details), num: true },
      { title: "consumers", value: (q) => q.consumers, num: true, sort: "consumers" },
    ], page.items, "No queues.")}</div>
    <h2>Add a queue</h2>
    <form id="add-queue">
      <label>Virtual host <select name="vhost">${vhosts.map((v) => `<option>${esc(v.name)}</option>`).join("")}</select></label>
      <label>Name <input name="name" required></label>
      <label>Durability <select name="durable"><option value="true">durable</option><option value="false">transient</option></select></label>
      <label>Arguments (JSON) <input name="arguments" value="{}"></label>
      <button>Add queue</button></form>`;
  const headers = main.querySelectorAll("#queue-table th");
  ["vhost", "name", null, "messages_ready", "messages_unacknowledged", "messages", null, null, "consumers"].forEach((field, i) => {
    if (field && headers[i]) headers[i].onclick = () => { queueQuery.reverse = queueQuery.sort === field && !queueQuery.reverse; queueQuery.sort = field; refresh(); };
  });
  document.getElementById("filter").onsubmit = (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    queueQuery.name = form.get("name");
    queueQuery.size = Number(form.get("size"));
    queueQuery.page = 1;
    refresh();
  };
  document.getElementById("previous").onclick = () => { queueQuery.page -= 1; refresh(); };
  document.getElementById("next").onclick = () => { queueQuery.page += 1; refresh(); };
  document.getElementById("add-queue").onsubmit = (event) => act(event, async (form) => {
    await api("PUT", `/queues/${seg(form.get("vhost"))}/${seg(form.get("name"))}`,
      { durable: form.get("durable") === "true", auto_delete: false, arguments: JSON.parse(form.get("arguments") || "{}") });
  });
  timer = setTimeout(refresh, 5000);
}

async function act(event, action) {
  event.preventDefault();
  try {
    await action(new FormData(event.target));
    showError("");
    await refresh();
  } catch (error) {
    showError(error.message);
  }
}

// The shown queue's samples: [time, ready, unacked, publish/s, deliver/s].
let queueHistory = { key: "", samples: [] };

async function queuePage(vhost, name) {
  const base = `/queues/${seg(vhost)}/${seg(name)}`;
  const [queue, bindings] = await Promise.all([api("GET", base), api("GET", base + "/bindings")]);
  if (queueHistory.key !== base) queueHistory = { key: base, samples: [] };
  const stats = queue.message_stats || {};
  queueHistory.samples.push([Date.now(), queue.messages_ready, queue.messages_unacknowledged,
    (stats.publish_details || {}).rate || 0, (stats.deliver_get_details || {}).rate || 0]);
  if (queueHistory.samples.length > 120) queueHistory.samples.shift();
  // Forms keep what was typed across the refresh.
  const same = document.getElementById("queue-name")?.textContent === name;
  const typed = same ? [...main.querySelectorAll("form input, form textarea")].filter((i) => i.name).map((i) => [i.closest("form").id, i.name, i.value]) : [];
  const shown = same ? document.getElementById("messages")?.innerHTML ?? "" : "";
  main.innerHTML = `<h1>Queue <span id="queue-name">${esc(name)}</span></h1>
    <p>virtual host ${esc(vhost)}, ${queue.durable ? "durable" : "transient"}${queue.auto_delete ? ", auto-delete" : ""}${queue.exclusive ? ", exclusive" : ""}, ${esc(queue.type)}</p>
    <div class="cards">
      <div class="card">ready<b id="queue-ready">${queue.messages_ready}</b></div>
      <div class="card">unacked<b id="queue-unacked">${queue.messages_unacknowledged}</b></div>
      <div class="card">total<b id="queue-total">${queue.messages}</b></div>
      <div class="card">publish<b>${rate(queue.message_stats.publish_details)}</b></div>
      <div class="card">deliver / get<b>${rate(queue.message_stats.deliver_get_details)}</b></div>
    </div>
    <h2>Depth and rates</h2>
    <canvas id="queue-depth" width="600" height="120" aria-label="ready (blue) and unacked (orange) over time"></canvas>
    <canvas id="queue-rates" width="600" height="120" aria-label="publish (green) and deliver/get (purple) per second over time"></canvas>
    <h2>Arguments</h2><pre>${esc(JSON.stringify(queue.arguments, null, 1))}</pre>
    <p id="queue-policy">policy: ${queue.policy ? `${esc(queue.policy)} <code>${esc(JSON.stringify(queue.effective_policy_definition))}</code>` : "none"}</p>
    <h2>Consumers</h2>
    ${table([{ title: "tag", value: (c) => c.consumer_tag }, { title: "channel", value: (c) => c.channel_details.name }, { title: "exclusive", value: (c) => c.exclusive }], queue.consumer_details || [], "No consumers.")}
    <h2>Bindings</h2>
    ${table([{ title: "from", value: (b) => b.source || "(default exchange)" }, { title: "routing key", value: (b) => b.routing_key }], bindings, "None.")}
    <form id="bind"><label>From exchange <input name="exchange" required></label><label>Routing key <input name="key"></label><button>Bind</button></form>
    <h2>Publish a message</h2>
    <form id="publish"><label>Payload <textarea name="payload" rows="2" cols="40"></textarea></label>
      <label>Delivery mode <select name="mode"><option value="1">transient</option><option value="2">persistent</option></select></label>
      <button>Publish message</button></form>
    <h2>Get messages</h2>
    <form id="get"><label>Ack mode <select name="ackmode"><option value="ack_requeue_true">Nack, requeue (peek)</option>
      <option value="ack_requeue_false">Ack, remove</option><option value="reject_requeue_false">Reject, dead-letter</option></select></label>
      <label>Messages <input name="count" type="number" value="1" min="1"></label><button>Get messages</button></form>
    <div id="messages">${shown}</div>
    <h2>Danger</h2>
    <form id="purge"><button>Purge messages</button></form>
    <form id="delete"><button>Delete queue</button></form>`;
  drawChart(document.getElementById("queue-depth"), queueHistory.samples.map(([t, r, u]) => [t, r, u]));
  drawChart(document.getElementById("queue-rates"), queueHistory.samples.map(([t, , , p, d]) => [t, p, d]), ["#16a34a", "#9333ea"]);
  for (const [form, field, value] of typed) {
    const input = document.querySelector(`#${form} [name="${field}"]`);
    if (input && input.type !== "file") input.value = value;
  }
  document.getElementById("bind").onsubmit = (event) => act(event, (form) =>
    api("POST", `/bindings/${seg(vhost)}/e/${seg(form.get("exchange"))}/q/${seg(name)}`, { routing_key: form.get("key"), arguments: {} }));
  document.getElementById("publish").onsubmit = (event) => act(event, async (form) => {
    const answer = await api("POST", `/exchanges/${seg(vhost)}/amq.default/publish`,
      { routing_key: name, payload: form.get("payload"), payload_encoding: "string", properties: { delivery_mode: Number(form.get("mode")) } });
    if (!answer.routed) throw new Error("Message published, but not routed.");
  });
  document.getElementById("get").onsubmit = async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    try {
      const got = await api("POST", base + "/get", { count: Number(form.get("count")), ackmode: form.get("ackmode"), encoding: "auto", truncate: 50000 });
      document.getElementById("messages").innerHTML = got.length ? got.map((m, i) => `<h3>Message ${i + 1}</h3>
        <p>exchange ${esc(m.exchange || "(default)")}, routing key ${esc(m.routing_key)}, redelivered ${m.redelivered}, ${m.message_count} left</p>
        <pre class="payload">${esc(m.payload)}</pre>`).join("") : "<p>Queue is empty.</p>";
    } catch (error) {
      showError(error.message);
    }
  };
  document.getElementById("purge").onsubmit = (event) => act(event, () => api("DELETE", base + "/contents"));
  timer = setTimeout(refresh, 5000);
  document.getElementById("delete").onsubmit = async (event) => {
    event.preventDefault();
    try {
      await api("DELETE", base);
      location.hash = "#/queues";
    } catch (error) {
      showError(error.message);
    }
  };
}

async function exchangesPage() {
  const exchanges = await api("GET", "/exchanges");
  main.innerHTML = `<h1>Exchanges</h1>
    ${table([{ title: "vhost", value: (x) => x.vhost }, { title: "name", value: (x) => x.name || "(AMQP default)" }, { title: "type", value: (x) => x.type },
      { title: "durable", value: (x) => x.durable }, { title: "publish in", value: (x) => rate((x.message_stats || {}).publish_in_details), num: true }], exchanges, "No exchanges.")}
    <h2>Publish a message</h2>
    <form id="publish-x"><label>Virtual host <input name="vhost" value="/"></label><label>Exchange <input name="exchange" value="amq.default"></label>
      <label>Routing key <input name="key"></label><label>Payload <input name="payload"></label><button>Publish</button></form>
    <p id="routed"></p>`;
  document.getElementById("publish-x").onsubmit = (event) => act(event, async (form) => {
    const answer = await api("POST", `/exchanges/${seg(form.get("vhost"))}/${seg(form.get("exchange") || "amq.default")}/publish`,
      { routing_key: form.get("key"), payload: form.get("payload"), payload_encoding: "string", properties: {} });
    document.getElementById("routed").textContent = answer.routed ? "Message published." : "Message published, but not routed.";
  });
}

async function connectionsPage() {
  const [connections, channels] = await Promise.all([api("GET", "/connections"), api("GET", "/channels")]);
  main.innerHTML = `<h1>Connections</h1>
    ${table([{ title: "name", html: (c) => `<a href="#/connections/${seg(c.name)}">${esc(c.name)}</a>` }, { title: "user", value: (c) => c.user }, { title: "vhost", value: (c) => c.vhost },
      { title: "channels", value: (c) => c.channels, num: true }, { title: "TLS", value: (c) => c.ssl },
      { title: "in", value: (c) => bytesRate(c.recv_oct_details), num: true }, { title: "out", value: (c) => bytesRate(c.send_oct_details), num: true },
      { title: "", html: (c) => `<button data-close="${esc(c.name)}">Close</button>` }], connections, "No connections.")}
    <h1>Channels</h1>
    ${channelTable(channels)}`;
  main.querySelectorAll("button[data-close]").forEach((button) => button.onclick = async () => {
    await fetch("/api/connections/" + seg(button.dataset.close), { method: "DELETE", headers: { "Authorization": "Basic " + credentials, "X-Reason": "Closed from the web UI" } });
    refresh();
  });
  timer = setTimeout(refresh, 5000);
}

function bytesRate(details) {
  const rate = (details && details.rate) || 0;
  return rate >= 1048576 ? (rate / 1048576).toFixed(1) + " MiB/s" : rate >= 1024 ? (rate / 1024).toFixed(1) + " KiB/s" : rate.toFixed(0) + " B/s";
}

function channelTable(channels) {
  return table([{ title: "channel", value: (c) => c.name }, { title: "user", value: (c) => c.user },
    { title: "mode", value: (c) => (c.confirm ? "confirm" : "") + (c.transactional ? "transactional" : "") },
    { title: "prefetch", value: (c) => c.prefetch_count || c.global_prefetch_count || "", num: true },
    { title: "consumers", value: (c) => c.consumer_count, num: true },
    { title: "unacked", value: (c) => c.messages_unacknowledged, num: true }], channels, "No channels.");
}

async function connectionPage(name) {
  const base = "/connections/" + seg(name);
  const [c, channels] = await Promise.all([api("GET", base), api("GET", base + "/channels")]);
  const client = c.client_properties || {};
  main.innerHTML = `<h1>Connection <span id="connection-name">${esc(name)}</span></h1>
    <div class="cards">
      <div class="card">user<b>${esc(c.user)}</b></div>
      <div class="card">virtual host<b>${esc(c.vhost)}</b></div>
      <div class="card">channels<b id="connection-channels">${c.channels}</b></div>
      <div class="card">received<b id="connection-recv">${c.recv_oct}</b>${bytesRate(c.recv_oct_details)}</div>
      <div class="card">sent<b>${c.send_oct}</b>${bytesRate(c.send_oct_details)}</div>
    </div>
    <p>${esc(c.protocol)} from ${esc(c.peer_host)}:${c.peer_port}${c.ssl ? " over TLS" : ""}, connected ${esc(new Date(c.connected_at).toLocaleString())};
      heartbeat ${c.timeout} s, frame max ${c.frame_max}, channel max ${c.channel_max}</p>
    <h2>Client</h2>
    <p id="client">${esc(client.product || "")} ${esc(client.version || "")} ${esc(client.platform || "")}${client.connection_name ? ` (${esc(client.connection_name)})` : ""}</p>
    <pre>${esc(JSON.stringify(client, null, 1))}</pre>
    <h2>Channels</h2>
    ${channelTable(channels)}
    <h2>Close</h2>
    <form id="close"><label>Reason <input name="reason" value="Closed from the web UI"></label><button>Close connection</button></form>`;
  document.getElementById("close").onsubmit = async (event) => {
    event.preventDefault();
    const reason = new FormData(event.target).get("reason");
    await fetch("/api" + base, { method: "DELETE", headers: { "Authorization": "Basic " + credentials, "X-Reason": reason } });
    location.hash = "#/connections";
  };
  timer = setTimeout(refresh, 5000);
}

async function policiesPage() {
  const [policies, vhosts] = await Promise.all([api("GET", "/policies"), api("GET", "/vhosts")]);
  main.innerHTML = `<h1>Policies</h1>
    <div id="policy-table">${table([{ title: "vhost", value: (p) => p.vhost }, { title: "name", value: (p) => p.name },
      { title: "pattern", value: (p) => p.pattern }, { title: "apply to", value: (p) => p["apply-to"] },
      { title: "definition", value: (p) => JSON.stringify(p.definition) }, { title: "priority", value: (p) => p.priority, num: true },
      { title: "", html: (p) => `<button data-vhost="${esc(p.vhost)}" data-policy="${esc(p.name)}">Delete</button>` }], policies, "No policies.")}</div>
    <h2>Add or replace a policy</h2>
    <form id="add-policy">
      <label>Virtual host <select name="vhost">${vhosts.map((v) => `<option>${esc(v.name)}</option>`).join("")}</select></label>
      <label>Name <input name="name" required></label>
      <label>Pattern <input name="pattern" required placeholder="^jobs\\."></label>
      <label>Apply to <select name="apply"><option>queues</option><option>exchanges</option><option>all</option></select></label>
      <label>Priority <input name="priority" type="number" value="0"></label>
      <label>Definition (JSON) <input name="definition" required placeholder='{"max-length": 1000}'></label>
      <button>Add policy</button></form>`;
  main.querySelectorAll("button[data-policy]").forEach((button) => button.onclick = async () => {
    try {
      await api("DELETE", `/policies/${seg(button.dataset.vhost)}/${seg(button.dataset.policy)}`);
      showError("");
    } catch (error) {
      showError(error.message);
    }
    refresh();
  });
  document.getElementById("add-policy").onsubmit = (event) => act(event, async (form) => {
    let definition;
    try {
      definition = JSON.parse(form.get("definition"));
    } catch (error) {
      throw new Error("The definition is not JSON: " + error.message);
    }
    await api("PUT", `/policies/${seg(form.get("vhost"))}/${seg(form.get("name"))}`,
      { pattern: form.get("pattern"), "apply-to": form.get("apply"), priority: Number(form.get("priority")), definition });
  });
}

async function adminPage() {
  const [users, vhosts, permissions] = await Promise.all([api("GET", "/users"), api("GET", "/vhosts"), api("GET", "/permissions")]);
  main.innerHTML = `<h1>Users</h1>
    ${table([{ title: "name", value: (u) => u.name }, { title: "tags", value: (u) => (u.tags || []).join(", ") }], users, "No users.")}
    <form id="add-user"><label>Name <input name="name" required></label><label>Password <input name="password" type="password" required></label>
      <label>Tags <input name="tags" placeholder="management"></label><button>Add user</button></form>
    <h1>Virtual hosts</h1>
    ${table([{ title: "name", value: (v) => v.name }, { title: "messages", value: (v) => v.messages, num: true }], vhosts, "None.")}
    <form id="add-vhost"><label>Name <input name="name" required></label><button>Add virtual host</button></form>
    <h1>Permissions</h1>
    ${table([{ title: "user", value: (p) => p.user }, { title: "vhost", value: (p) => p.vhost }, { title: "configure", value: (p) => p.configure },
      { title: "write", value: (p) => p.write }, { title: "read", value: (p) => p.read }], permissions, "None.")}
    <form id="set-permission"><label>User <input name="user" required></label><label>Virtual host <input name="vhost" value="/"></label>
      <label>Configure <input name="configure" value=".*"></label><label>Write <input name="write" value=".*"></label><label>Read <input name="read" value=".*"></label>
      <button>Set permission</button></form>
    <h1>Definitions</h1>
    <p><button id="export">Download definitions</button></p>
    <form id="import"><label>Definitions file <input name="file" type="file" accept="application/json" required></label><button>Upload definitions</button></form>`;
  document.getElementById("add-user").onsubmit = (event) => act(event, (form) =>
    api("PUT", "/users/" + seg(form.get("name")), { password: form.get("password"), tags: form.get("tags") }));
  document.getElementById("add-vhost").onsubmit = (event) => act(event, (form) => api("PUT", "/vhosts/" + seg(form.get("name"))));
  document.getElementById("set-permission").onsubmit = (event) => act(event, (form) =>
    api("PUT", `/permissions/${seg(form.get("vhost"))}/${seg(form.get("user"))}`, { configure: form.get("configure"), write: form.get("write"), read: form.get("read") }));
  document.getElementById("export").onclick = async () => {
    const definitions = await api("GET", "/definitions");
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([JSON.stringify(definitions, null, 1)], { type: "application/json" }));
    link.download = "warren-definitions.json";
    link.click();
  };
  document.getElementById("import").onsubmit = (event) => act(event, async (form) =>
    api("POST", "/definitions", JSON.parse(await form.get("file").text())));
}

async function refresh() {
  clearTimeout(timer);
  if (!credentials) return loginPage();
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  try {
    if (parts[0] === "queues" && parts.length >= 3) await queuePage(parts[1], parts.slice(2).join("/"));
    else if (parts[0] === "queues") await queuesPage();
    else if (parts[0] === "exchanges") await exchangesPage();
    else if (parts[0] === "connections" && parts.length >= 2 && parts[1]) await connectionPage(parts.slice(1).join("/"));
    else if (parts[0] === "connections") await connectionsPage();
    else if (parts[0] === "policies") await policiesPage();
    else if (parts[0] === "admin") await adminPage();
    else await overviewPage();
  } catch (error) {
    showError(error.message);
  }
}

async function route() {
  if (!credentials) return loginPage();
  try {
    const me = await api("GET", "/whoami");
    document.getElementById("nav").hidden = false;
    document.getElementById("nav-admin").hidden = !me.tags.includes("administrator");
    document.getElementById("nav-policies").hidden = !me.tags.includes("administrator") && !me.tags.includes("policymaker");
    document.getElementById("who").innerHTML = `${esc(me.name)} <button id="logout">Log out</button>`;
    document.getElementById("logout").onclick = () => { sessionStorage.removeItem("warren-credentials"); credentials = null; loginPage(); };
  } catch (error) {
    credentials = null;
    sessionStorage.removeItem("warren-credentials");
    showError(error.message);
    return loginPage();
  }
  await refresh();
}

window.addEventListener("hashchange", refresh);
route();
