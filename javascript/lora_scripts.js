// LoRA Training tab: live runs, loss curve, daemon status, setup log, and Lora card refresh + toast.
// Polls the extension's REST routes (./lora-scripts/v1/...) instead of gradio timers, so it behaves the same under
// gradio 3.41 (A1111) and 4.40 (Forge) and in standalone mode. Relative URLs keep --subpath working.
(function () {
    "use strict";
    const API = "./lora-scripts/v1";
    // `pinned` is a run the person clicked; without one, the view follows the active training run.
    const state = {since: -1, pinned: localStorage.getItem("lora_scripts_run") || "", selected: "", metrics: {},
                   setupNext: 0, busy: false, lastRuns: []};

    function root() {
        if (typeof gradioApp === "function") return gradioApp();
        const app = document.querySelector("gradio-app");
        return (app && app.shadowRoot) || document;
    }
    function byId(id) { return root().querySelector("#" + id); }
    function esc(value) {
        return String(value === null || value === undefined ? "" : value).replace(/[&<>"']/g,
            (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
    }
    function fmtTime(seconds) {
        if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
        seconds = Math.round(seconds);
        const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
        return (h ? h + "h " : "") + (h || m ? m + "m " : "") + s + "s";
    }
    function fmtNum(value, digits) {
        return (value === null || value === undefined || !isFinite(value)) ? "" : Number(value).toFixed(digits);
    }

    // ---------------------------------------------------------------- runs table and details
    // What a running run does besides steps (the daemon's `phase`): rendering samples, prompt i/n, denoising j/m.
    function phaseText(r) {
        const p = r.phase || {};
        if (p.phase !== "sample") return "";
        let text = `sampling prompt ${p.prompt_index || "?"}/${p.prompts || "?"}`;
        if (p.denoise_steps) text += `, step ${p.denoise_step || 0}/${p.denoise_steps}`;
        return text;
    }
    // The memory plan the run worked out as its first phase; "planning…" until it arrives.
    function planText(r) {
        const p = r.plan;
        if (!p) return r.kind !== "caption" && ["running", "cancelling"].includes(r.status) && !r.step ? "planning…" : "";
        if (p.error) return "no plan";
        if (p.estimate_mb === null || p.estimate_mb === undefined) return "";
        const mb = (v) => v >= 1024 ? (v / 1024).toFixed(1) + " GB" : Math.round(v) + " MB";
        return `${mb(p.estimate_mb)} of ${mb((p.capacity_mb || 0) * 0.9)} ${p.fits ? "fits" : "does NOT fit"}`;
    }

    // "paused for generation": a paused run says why (the daemon stores the reason of the pause).
    function statusText(r) {
        return ["pausing", "paused"].includes(r.status) ? `${r.status} for ${r.pause_reason || "user"}` : r.status;
    }

    function runsTable(runs) {
        if (!runs.length) return '<p class="lora-scripts-empty">No runs yet: start one in the Train section.</p>';
        const rows = runs.map((r) => {
            const total = r.total_steps || 0, step = r.step || 0;
            const pct = total ? Math.min(100, Math.round(100 * step / total)) : (r.status === "finished" ? 100 : 0);
            const live = ["running", "cancelling"].includes(r.status);
            const phase = live ? phaseText(r) : "";
            const plan = planText(r);
            return `<tr data-run-id="${esc(r.id)}" data-status="${esc(r.status)}" class="${r.id === state.selected ? "selected" : ""}">` +
                `<td>${esc(r.name)}</td><td class="lora-scripts-status-${esc(r.status)}">${esc(statusText(r))}</td>` +
                `<td class="lora-scripts-progress-cell"><div class="lora-scripts-progress"><div style="width:${pct}%"></div></div>${step}/${total || "?"}` +
                (phase ? ` <span class="lora-scripts-phase">${esc(phase)}</span>` : "") + `</td>` +
                `<td class="lora-scripts-eta">${live ? esc(fmtTime(r.eta_s)) : ""}</td><td>${esc(fmtNum(r.loss, 4))}</td>` +
                `<td class="lora-scripts-its">${esc(fmtNum(r.it_s, 2))}</td>` +
                `<td class="lora-scripts-plan${r.plan && r.plan.fits === false ? " lora-scripts-error" : ""}">${esc(plan)}</td>` +
                `<td>${esc(r.kind)}</td></tr>`;
        }).join("");
        return '<table id="lora_scripts_runs_table" class="lora-scripts-table"><thead><tr><th>run</th><th>status</th>' +
            "<th>progress</th><th>ETA</th><th>loss</th><th>it/s</th><th>memory plan</th><th>kind</th></tr></thead><tbody>" + rows +
            "</tbody></table>";
    }

    // Exponential moving average, debiased like TensorBoard's smoothing, so the trend shows through noisy steps.
    function smooth(values, weight) {
        const out = [];
        let last = 0, n = 0;
        for (const v of values) { last = last * weight + (1 - weight) * v; n += 1; out.push(last / (1 - Math.pow(weight, n))); }
        return out;
    }
    // Round tick values: 1, 2 or 5 times a power of ten, about `count` of them across [lo, hi].
    function ticks(lo, hi, count) {
        if (!(hi > lo)) return [lo];
        const raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
        const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
        const out = [];
        for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
        return out;
    }
    function fmtTick(v) {
        const a = Math.abs(v);
        return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(1) : String(Number(v.toPrecision(3)));
    }

    function lossCurve(points) {
        if (points.length < 2) return '<div id="lora_scripts_loss_curve" data-points="' + points.length + '">Loss curve: waiting for steps…</div>';
        const w = 640, h = 220, left = 56, right = 12, top = 10, bottom = 38;
        const steps = points.map((p) => p.step), losses = points.map((p) => p.loss);
        const smoothed = smooth(losses, points.length > 20 ? 0.9 : 0.6);
        const x0 = Math.min(...steps), x1 = Math.max(...steps), y0 = Math.min(...losses), y1 = Math.max(...losses);
        const sx = (v) => left + (w - left - right) * (x1 === x0 ? 0 : (v - x0) / (x1 - x0));
        const sy = (v) => h - bottom - (h - top - bottom) * (y1 === y0 ? 0.5 : (v - y0) / (y1 - y0));
        const line = (ys) => points.map((p, i) => sx(p.step).toFixed(1) + "," + sy(ys[i]).toFixed(1)).join(" ");
        const xt = ticks(x0, x1, 5).filter((v) => Number.isInteger(v));
        const yt = ticks(y0, y1, 4);
        const grid = yt.map((v) => `<line class="lora-scripts-grid" x1="${left}" x2="${w - right}" y1="${sy(v).toFixed(1)}" y2="${sy(v).toFixed(1)}"/>` +
            `<text class="lora-scripts-tick" x="${left - 6}" y="${(sy(v) + 4).toFixed(1)}" text-anchor="end">${esc(fmtTick(v))}</text>`).join("") +
            xt.map((v) => `<line class="lora-scripts-grid" x1="${sx(v).toFixed(1)}" x2="${sx(v).toFixed(1)}" y1="${h - bottom}" y2="${h - bottom + 4}"/>` +
            `<text class="lora-scripts-tick" x="${sx(v).toFixed(1)}" y="${h - bottom + 16}" text-anchor="middle">${esc(String(v))}</text>`).join("");
        const axes = `<line class="lora-scripts-axis" x1="${left}" y1="${top}" x2="${left}" y2="${h - bottom}"/>` +
            `<line class="lora-scripts-axis" x1="${left}" y1="${h - bottom}" x2="${w - right}" y2="${h - bottom}"/>` +
            `<text class="lora-scripts-axis-title" x="${(left + w - right) / 2}" y="${h - 4}" text-anchor="middle">step</text>` +
            `<text class="lora-scripts-axis-title" x="12" y="${(top + h - bottom) / 2}" text-anchor="middle" transform="rotate(-90 12 ${(top + h - bottom) / 2})">loss</text>`;
        return `<div id="lora_scripts_loss_curve" data-points="${points.length}"><div class="lora-scripts-curve-label">` +
            `loss ${fmtNum(y1, 4)} → ${fmtNum(losses[losses.length - 1], 4)} (min ${fmtNum(y0, 4)}; smoothed ${fmtNum(smoothed[smoothed.length - 1], 4)}), steps ${x0}–${x1}` +
            ` <span class="lora-scripts-legend"><i class="raw"></i>raw <i class="smoothed"></i>smoothed</span></div>` +
            `<svg viewBox="0 0 ${w} ${h}" preserveAspectRatio="none">${grid}${axes}` +
            `<polyline class="lora-scripts-loss-raw" fill="none" stroke="currentColor" stroke-opacity="0.35" stroke-width="1" points="${line(losses)}"/>` +
            `<polyline class="lora-scripts-loss-smoothed" fill="none" stroke="currentColor" stroke-width="2" points="${line(smoothed)}"/></svg></div>`;
    }

    function details(sel) {
        const r = sel.run;
        const points = state.metrics[r.id] || [];
        const actions = [];
        if (["queued", "running", "paused"].includes(r.status)) actions.push(["cancel", "Cancel (save and stop)"]);
        if (r.status === "running" && !["caption", "tools"].includes(r.kind)) actions.push(["pause", "Pause (save and wait)"]);
        if (["cancelled", "failed", "stopped", "paused"].includes(r.status)) actions.push(["resume", "Resume"]);
        if (["cancelled", "failed", "finished", "stopped"].includes(r.status)) actions.push(["retry", "Retry"]);
        // 👍/👎: the recommendation learns from them (lora-daemon rate); the current rating is pressed
        if (["finished", "failed", "cancelled"].includes(r.status) && ["image", "text"].includes(r.kind)) {
            actions.push([r.rating === "up" ? "rate_clear" : "rate_up", r.rating === "up" ? "👍 (rated)" : "👍"]);
            actions.push([r.rating === "down" ? "rate_clear" : "rate_down", r.rating === "down" ? "👎 (rated)" : "👎"]);
        }
        const buttons = actions.map(([a, label]) =>
            `<button class="lora-scripts-action" data-action="${a}" data-run-id="${esc(r.id)}">${esc(label)}</button>`).join(" ");
        const samples = sel.samples.map((p) =>
            `<figure><img loading="lazy" src="${API}/runs/${encodeURIComponent(r.id)}/file?path=${encodeURIComponent(p)}"><figcaption>${esc(p.split("/").pop())}</figcaption></figure>`).join("");
        const completions = (sel.completions || []).map((c) =>
            `<div class="lora-scripts-completion"><div class="lora-scripts-prompt">${esc(c.prompt)} <small>step ${esc(c.step)}</small></div>` +
            `<pre class="lora-scripts-log">${esc(c.text)}${c.truncated ? "…" : ""}</pre></div>`).join("");
        const published = r.published_file ? `<p class="lora-scripts-ok">Published: <code>${esc(r.published_file)}</code></p>` : "";
        const error = r.error ? `<p class="lora-scripts-error">${esc(r.error)}</p>` : "";
        const phase = ["running", "cancelling"].includes(r.status) ? phaseText(r) : "";
        const plan = planText(r);
        const facts = (plan ? `<p id="lora_scripts_run_plan">Memory plan: ${esc(plan)}</p>` : "") +
            (phase ? `<p id="lora_scripts_run_phase" class="lora-scripts-phase">Now ${esc(phase)}</p>` : "");
        return `<div id="lora_scripts_run_details" data-run-id="${esc(r.id)}" data-status="${esc(r.status)}">` +
            `<h3>${esc(r.name)} <small>${esc(r.id)} · ${esc(statusText(r))}</small></h3>${buttons}${published}${error}${facts}` +
            // a finished run's file (inspect summary) and a toolbox job's report: HTML escaped by the routes
            `<div id="lora_scripts_run_file">${sel.report_html || ""}${sel.inspect_html || ""}</div>` +
            (sel.health_html || "") +  // training-health warnings with advice, HTML escaped by render.health_list
            lossCurve(points) +
            `<details open><summary>Log</summary><pre id="lora_scripts_run_log" class="lora-scripts-log">${esc(sel.log.join("\n"))}</pre></details>` +
            (samples ? `<details open><summary>Samples</summary><div class="lora-scripts-samples">${samples}</div></details>` : "") +
            (completions ? `<details open><summary>Sample completions</summary><div id="lora_scripts_completions">${completions}</div></details>` : "") +
            `<details><summary>Config snapshot</summary><pre class="lora-scripts-log">${esc(JSON.stringify(r.config, null, 2))}</pre></details></div>`;
    }

    function setSelectedInput(runId) {
        const box = byId("lora_scripts_selected_run");
        const input = box && box.querySelector("textarea, input");
        if (!input || input.value === runId) return;
        input.value = runId;
        input.dispatchEvent(new Event("input", {bubbles: true}));
    }

    function pickDefault(runs) {
        if (state.pinned && runs.some((r) => r.id === state.pinned)) return state.pinned;
        const active = runs.find((r) => ["running", "cancelling", "pausing", "paused", "queued"].includes(r.status) && r.kind !== "caption");
        return active ? active.id : (runs.length ? runs[0].id : "");
    }

    function select(runId) {
        state.pinned = state.selected = runId;
        localStorage.setItem("lora_scripts_run", runId);
        setSelectedInput(runId);
        poll();
    }

    // ---------------------------------------------------------------- daemon, setup
    // The Daemon section: what is true for this tab — where ITS runs publish (the WebUI's Lora folder, sent with
    // every Start), the daemon's own default for terminal submits, where each captioner's weights are looked for.
    function daemonStatus(d, tabLoraDir) {
        if (!d || !d.up) return `<div class="lora-scripts-msg lora-scripts-error" id="lora_scripts_daemon_state" data-running="false">` +
            `Daemon not running. ${esc((d && d.message) || "")}</div>`;
        const gpus = (d.gpus || []).map((g) => `${esc(g.slot)}${g.run_id ? " (busy: " + esc(g.run_id) + ")" : " (free)"}`).join(", ");
        const own = tabLoraDir || d.lora_dir;
        const other = d.lora_dir && d.lora_dir !== own ?
            ` <small>(runs queued from a terminal with <code>lora-daemon submit</code> go to <code>${esc(d.lora_dir)}</code>)</small>` : "";
        const captioners = (d.captioners || []).map((c) => `<li class="lora-scripts-captioner" data-name="${esc(c.name)}">Captioner ${esc(c.name)}: ` +
            (c.ready ? "ready" + (c.model_dir ? ` (weights in <code>${esc(c.model_dir)}</code>)` : "") :
                `no weights yet — put them in <code>${esc(c.model_dir || "?")}</code>`) + "</li>").join("");
        return `<div class="lora-scripts-msg lora-scripts-ok" id="lora_scripts_daemon_state" data-running="true">` +
            `Daemon ${esc(d.version)} running (pid ${esc(d.pid)}, up ${esc(fmtTime(d.uptime_s))}) at ${esc(d.endpoint)}</div>` +
            `<ul><li>Devices: ${gpus || "none"}</li><li>Queue: ${esc(d.queue_length)} waiting, ${esc(d.running)} running</li>` +
            `<li>State folder: <code>${esc(d.home)}</code></li>` +
            `<li id="lora_scripts_publish_dir">This tab publishes LoRAs to: <code>${esc(own)}</code>${other}</li>${captioners}</ul>`;
    }

    async function pollSetup() {
        const pre = byId("lora_scripts_setup_log");
        if (!pre) return;
        const res = await fetch(`${API}/setup?since=${state.setupNext}`);
        if (!res.ok) return;
        const data = await res.json();
        if (data.lines && data.lines.length) {
            pre.textContent += data.lines.join("\n") + "\n";
            pre.scrollTop = pre.scrollHeight;
        }
        state.setupNext = data.next || state.setupNext;
    }

    // ---------------------------------------------------------------- new LoRA files: cards + toast
    async function refreshCards(name) {
        try { await fetch("./sdapi/v1/refresh-loras", {method: "POST"}); } catch (e) { /* standalone: no WebUI API */ }
        for (const tab of ["txt2img", "img2img"]) {
            const button = byId(`${tab}_lora_extra_refresh_internal`);
            if (button) button.dispatchEvent(new Event("click"));
        }
        // A1111 cannot rebuild the cards while no model is loaded; add this one card by hand if it did not appear.
        setTimeout(async () => {
            for (const tab of ["txt2img", "img2img"]) {
                const cards = byId(`${tab}_lora_cards`);
                if (!cards || cards.querySelector(`.card[data-name="${CSS.escape(name)}"]`)) continue;
                try {
                    const res = await fetch(`./sd_extra_networks/get-single-card?page=lora&tabname=${tab}&name=${encodeURIComponent(name)}`);
                    if (!res.ok) continue;
                    const data = await res.json();
                    if (data.html) cards.insertAdjacentHTML("beforeend", data.html);
                } catch (e) { /* nothing more to try */ }
            }
        }, 3000);
    }

    function copyText(text) {
        if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
        const area = document.createElement("textarea");
        area.value = text;
        document.body.appendChild(area);
        area.select();
        document.execCommand("copy");
        area.remove();
        return Promise.resolve();
    }

    function toast(name) {
        let host = document.getElementById("lora_scripts_toast_stack");
        if (!host) {
            host = document.createElement("div");
            host.id = "lora_scripts_toast_stack";
            document.body.appendChild(host);
        }
        const tag = `<lora:${name}:0.8>`;
        const el = document.createElement("div");
        el.className = "lora-scripts-toast";
        el.innerHTML = `<span><b>${esc(name)}</b> is ready — <code>${esc(tag)}</code></span>` +
            '<button class="lora-scripts-copy">Copy</button><button class="lora-scripts-close" title="Close">×</button>';
        el.querySelector(".lora-scripts-copy").addEventListener("click", (ev) => {
            copyText(tag).then(() => { ev.target.textContent = "Copied"; });
        });
        el.querySelector(".lora-scripts-close").addEventListener("click", () => el.remove());
        host.appendChild(el);
        setTimeout(() => el.remove(), 60000);
    }

    // ---------------------------------------------------------------- the poll
    async function poll() {
        const runsHost = byId("lora_scripts_runs_live");
        if (!runsHost || state.busy) return;
        state.busy = true;
        try {
            const points = state.metrics[state.selected] || [];
            const since = points.length ? points[points.length - 1].step : 0;
            const url = `${API}/live?since=${state.since}&metrics_since=${since}` +
                (state.selected ? `&run=${encodeURIComponent(state.selected)}` : "");
            const res = await fetch(url);
            if (!res.ok) { runsHost.innerHTML = `<p class="lora-scripts-error">Status route answered ${res.status}</p>`; return; }
            const data = await res.json();
            const daemonHost = byId("lora_scripts_daemon_live");
            if (daemonHost) daemonHost.innerHTML = daemonStatus(data.daemon, data.lora_dir);
            handoffView(data.handoff);
            state.lastRuns = data.runs || [];
            const wanted = pickDefault(state.lastRuns);
            if (wanted !== state.selected) { state.selected = wanted; setSelectedInput(wanted); }
            let html = runsTable(state.lastRuns);
            if (data.selected && data.selected.run.id === state.selected) {
                const list = state.metrics[state.selected] || (state.metrics[state.selected] = []);
                for (const m of data.selected.metrics || []) {
                    if (m.loss !== null && m.loss !== undefined && (!list.length || m.step > list[list.length - 1].step)) list.push(m);
                }
                html += details(data.selected);
            }
            runsHost.innerHTML = html;
            if (state.since >= 0) for (const item of (data.loras && data.loras.items) || []) { toast(item.name); refreshCards(item.name); }
            if (data.loras) state.since = data.loras.latest;
            if (data.setup && data.setup.status !== "idle") await pollSetup();
        } catch (e) {
            runsHost.innerHTML = `<p class="lora-scripts-error">Cannot reach the status route: ${esc(e)}</p>`;
        } finally {
            state.busy = false;
        }
    }

    // The GPU hand-off inside a WebUI: the "ask" setting's question (any section) and the Daemon section's line.
    // HTML made (and escaped) by gpu_handoff.py; replaced only when it changes, so a button is never swapped
    // under the pointer.
    function handoffView(h) {
        for (const [id, html] of [["lora_scripts_handoff_ask", (h && h.question_html) || ""],
                                  ["lora_scripts_handoff_live", (h && h.setting_html) || ""]]) {
            const host = byId(id);
            if (host && host.dataset.shown !== html) { host.innerHTML = html; host.dataset.shown = html; }
        }
    }

    async function onClick(ev) {
        const answer = ev.target.closest && ev.target.closest(".lora-scripts-handoff[data-handoff]");
        if (answer) {
            answer.disabled = true;
            const res = await fetch(`${API}/handoff/${answer.dataset.handoff}`, {method: "POST"});
            if (!res.ok) {
                const data = await res.json().catch(() => ({}));
                toastError((data.error && data.error.message) || `${answer.dataset.handoff} failed (${res.status})`);
            }
            poll();
            return;
        }
        const row = ev.target.closest && ev.target.closest("#lora_scripts_runs_table tr[data-run-id]");
        if (row) { select(row.dataset.runId); return; }
        const action = ev.target.closest && ev.target.closest(".lora-scripts-action");
        if (action) {
            action.disabled = true;
            const res = await fetch(`${API}/runs/${encodeURIComponent(action.dataset.runId)}/${action.dataset.action}`, {method: "POST"});
            if (!res.ok) {
                const data = await res.json().catch(() => ({}));
                toastError((data.error && data.error.message) || `${action.dataset.action} failed (${res.status})`);
            }
            poll();
        }
    }

    function toastError(text) {
        const host = byId("lora_scripts_runs_live");
        if (host) host.insertAdjacentHTML("afterbegin", `<p class="lora-scripts-error">${esc(text)}</p>`);
    }

    function start() {
        if (window.loraScriptsStarted) return;
        window.loraScriptsStarted = true;
        document.addEventListener("click", onClick, true);
        const tick = () => {
            const active = state.lastRuns.some((r) => ["running", "cancelling", "pausing", "paused", "queued"].includes(r.status));
            poll().finally(() => setTimeout(tick, active ? 1000 : 2500));
        };
        tick();
    }

    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
    else start();
})();
