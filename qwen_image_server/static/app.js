/* Qwen-Image playground: plain JavaScript, no build step, no third-party code.
 *
 * Talks to the public API only: GET /info (aspect ratios, models and their tasks), POST /v1/jobs
 * (with a start picture, mask or control image as base64 fields when given; a mask with the
 * control image and no start picture is ControlNet inpainting; in Edit mode,
 * /v1/jobs/edit with the images and the painted mask as multipart files), the job's SSE stream
 * (read with fetch + a stream parser, so an Authorization header can be sent), its image, DELETE
 * to cancel; in Layers mode, POST /v1/images/edits with the layered model (one RGBA PNG a layer,
 * no job and no step events there). Results are kept in this browser's IndexedDB (the server forgets job images
 * after its result TTL). URLs are relative, so the page also works behind a path prefix.
 */
"use strict";

(() => {
  // The documented defaults of POST /generate (README / GenerateRequest); steps and CFG are
  // replaced by the server's own (/info "defaults": a Lightning LoRA changes them).
  let DEFAULTS = Object.freeze({
    negative_prompt: " ",
    aspect_ratio: "s1:1",
    num_inference_steps: 20,
    true_cfg_scale: 4.0,
    seed: 42,
    language: "en",
    save_to_file: false,
    add_overlay: true,
  });
  // Used until /info answers (and if it never does).
  const FALLBACK_RATIOS = {
    "s1:1": [512, 512], "m1:1": [512, 512], "1:1": [1328, 1328], "16:9": [1664, 928],
    "9:16": [928, 1664], "4:3": [1472, 1104], "3:4": [1104, 1472], "3:2": [1584, 1056],
    "2:3": [1056, 1584],
  };
  const LABELS = {
    prompt: "Prompt", negative_prompt: "Negative prompt", aspect_ratio: "Aspect ratio",
    num_inference_steps: "Steps", true_cfg_scale: "CFG scale", seed: "Seed",
    language: "Language", add_overlay: "Info strip", save_to_file: "Save on the server",
    image: "Images", mask: "Mask", loras: "LoRA", lora_scale: "LoRA scale",
    start_image: "Picture", start_mask: "Mask", strength: "Strength", control_image: "Control image", control_mask: "Mask",
    controlnet_conditioning_scale: "ControlNet scale", control_guidance_start: "ControlNet from",
    control_guidance_end: "ControlNet until", layered_image: "Picture", layers: "Layers",
    resolution: "Resolution",
  };
  // The API names a request's pictures `image` and `mask`: which field of the page that is
  // depends on the mode.
  const PARAM_FIELDS = {
    generate: { image: "start_image", mask: "start_mask" },
    edit: {},
    layered: { image: "layered_image" },
  };
  const FIELDS = Object.keys(LABELS);
  // A job's final states, as the server names them (/info "job_states"); until /info answers,
  // the end of a job's event stream (the server closes it after the final event) says it is done.
  let FINAL = new Set();
  const STORE = "qwen-image-playground";
  const KEY_ITEM = `${STORE}.api-key`;
  const SETTINGS_ITEM = `${STORE}.settings`;
  const PENDING_ITEM = `${STORE}.pending-job`;
  const MAX_GALLERY = 60;

  const $ = (id) => document.getElementById(id);
  const form = $("generate-form");
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // -- small storage helpers (localStorage may be unavailable or full) ---------------------
  const local = {
    get(name) { try { return localStorage.getItem(name); } catch { return null; } },
    set(name, value) { try { localStorage.setItem(name, value); } catch { /* private mode or full */ } },
    remove(name) { try { localStorage.removeItem(name); } catch { /* ignore */ } },
    json(name) { try { return JSON.parse(this.get(name) || "null"); } catch { return null; } },
  };

  // -- API access ------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, detail, retryAfter = null) {
      super(detail.message || `The server answered ${status}.`);
      this.status = status; // 0: no answer at all (server down or network error)
      this.type = detail.type || null;
      this.param = detail.param || null;
      this.code = detail.code || null;
      this.retryAfter = retryAfter;
    }
  }

  let apiKey = local.get(KEY_ITEM) || "";
  let keyRequest = null; // {promise, resolve} while the key form is shown

  async function rawFetch(path, options = {}) {
    const headers = { ...(options.headers || {}) };
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    try {
      return await fetch(path, { ...options, headers });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, {
        type: "network_error",
        message: "Cannot reach the server. Check that it is running and that this computer is online, then try again.",
      });
    }
  }

  async function errorOf(response) {
    let detail = {};
    try {
      const body = await response.json();
      if (body && typeof body.error === "object") detail = body.error;
    } catch { /* not JSON: a proxy page or similar */ }
    if (!detail.message) {
      detail = { ...detail, message: `The server answered ${response.status} ${response.statusText}`.trim() + "." };
    }
    const retry = Number.parseInt(response.headers.get("Retry-After") || "", 10);
    return new ApiError(response.status, detail, Number.isFinite(retry) ? retry : null);
  }

  /** fetch() that throws ApiError on any failure, and asks for the API key on 401, then retries. */
  async function request(path, options = {}) {
    for (;;) {
      const response = await rawFetch(path, options);
      if (response.ok) return response;
      const error = await errorOf(response);
      if (response.status !== 401) throw error;
      await askForKey(apiKey ? "The saved API key was not accepted. Enter a valid key." : null);
    }
  }

  // -- the API key form ----------------------------------------------------------------
  function askForKey(problem) {
    if (keyRequest) return keyRequest.promise;
    let resolve;
    const promise = new Promise((r) => { resolve = r; });
    keyRequest = { promise, resolve };
    const error = $("key-error");
    error.hidden = !problem;
    error.textContent = problem || "";
    $("api-key").value = "";
    $("key-form").hidden = false;
    $("api-key").focus();
    $("server-info").textContent = "Waiting for the API key…";
    setStatus("This server needs an API key: enter it above.");
    return promise;
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("api-key").value.trim();
    if (!value) {
      $("key-error").textContent = "Enter the key first.";
      $("key-error").hidden = false;
      $("api-key").focus();
      return;
    }
    apiKey = value;
    local.set(KEY_ITEM, value);
    $("key-form").hidden = true;
    $("forget-key").hidden = false;
    if (!current) setStatus("API key saved.");
    const waiting = keyRequest;
    keyRequest = null;
    if (waiting) waiting.resolve();
  });

  $("forget-key").hidden = !apiKey;
  $("forget-key").addEventListener("click", () => {
    apiKey = "";
    local.remove(KEY_ITEM);
    $("forget-key").hidden = true;
    loadInfo();
  });

  // -- Server-Sent Events over fetch (EventSource cannot send an Authorization header) ------
  async function* events(path, signal) {
    const response = await request(path, { headers: { Accept: "text/event-stream" }, cache: "no-store", signal });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let name = "";
    let data = [];
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value;
        const lines = buffer.split("\n");
        buffer = lines.pop();
        for (const raw of lines) {
          const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
          if (line === "") { // end of one event
            if (data.length) yield { event: name || "message", data: JSON.parse(data.join("\n")) };
            name = "";
            data = [];
            continue;
          }
          if (line.startsWith(":")) continue; // keep-alive comment
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (field === "event") name = text;
          else if (field === "data") data.push(text);
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  // -- server info and the aspect-ratio list -------------------------------------------------
  let ratios = FALLBACK_RATIOS;
  let infoTimer = null;

  function fillRatios(map, names) {
    const select = $("aspect_ratio");
    const chosen = select.value || DEFAULTS.aspect_ratio;
    select.replaceChildren();
    for (const name of names) {
      const size = map[name];
      const option = document.createElement("option");
      option.value = name;
      option.textContent = size ? `${name} — ${size[0]} × ${size[1]}` : name;
      select.append(option);
    }
    select.value = names.includes(chosen) ? chosen : names.includes(DEFAULTS.aspect_ratio) ? DEFAULTS.aspect_ratio : names[0];
  }

  function useServerDefaults(server) {
    const previous = DEFAULTS;
    DEFAULTS = Object.freeze({ ...DEFAULTS, num_inference_steps: server.num_inference_steps,
                               true_cfg_scale: server.true_cfg_scale });
    // Fields still showing the old default follow the server's; values the user chose stay.
    for (const id of ["num_inference_steps", "true_cfg_scale"]) {
      if (Number($(id).value) === previous[id] && previous[id] !== DEFAULTS[id]) {
        $(id).value = String(DEFAULTS[id]);
        $(id).dispatchEvent(new Event("input"));
      }
    }
  }

  async function loadInfo() {
    clearTimeout(infoTimer);
    try {
      const info = await (await request("info")).json();
      ratios = info.aspect_ratios || FALLBACK_RATIOS;
      fillRatios(ratios, info.supported_aspect_ratios || Object.keys(ratios));
      if (info.defaults) useServerDefaults(info.defaults);
      if (info.job_states) FINAL = new Set(info.job_states.final);
      if (Array.isArray(info.models)) {
        const canEdit = info.models.some((m) => (m.tasks || []).includes("edit"));
        const loading = info.models.some((m) => !(m.tasks || []).length);
        $("mode-edit").disabled = !canEdit && !loading;
        $("mode-help").hidden = canEdit || loading;
        // Requests without a model go to the first one: it is the one the Generate mode uses.
        const first = info.models[0];
        $("control-fields").hidden = !(first && (first.tasks || []).includes("controlnet"));
        controlInpaint = Boolean(first && (first.tasks || []).includes("controlnet-inpaint"));
        showControlInpaint();
        const layered = info.models.find((m) => (m.tasks || []).includes("layered"));
        layeredModel = layered ? layered.name : null;
        $("mode-layered").disabled = !layered && !loading;
        $("layered-help").hidden = Boolean(layered) || loading;
        if ($("control-fields").hidden && controlFile) removeControl();
        if (first && (first.tasks || []).includes("controlnet")) loadControlnets(first.name);
      }
      const where = info.gpu ? `${info.device} (${info.gpu})` : info.device;
      const state = info.model_loaded ? "" : " · model loading, jobs wait until it is ready";
      $("server-info").textContent = `${info.model_name} on ${where} · v${info.version}${state}`;
      hideBanner();
      loadLoras();
      if (!info.model_loaded) infoTimer = setTimeout(loadInfo, 3000);
    } catch (err) {
      $("server-info").textContent = "Server not reachable.";
      showBanner(`${plainError(err)} (Retrying in a few seconds.)`);
      infoTimer = setTimeout(loadInfo, 5000);
    }
  }

  // -- the LoRA picker: the usable LoRAs of GET /v1/loras (hidden when the server has none) --
  async function loadLoras() {
    let list;
    try {
      list = (await (await request("v1/loras")).json()).data || [];
    } catch {
      return; // an older server, or none reachable: no picker
    }
    const select = $("loras");
    const chosen = select.value;
    select.replaceChildren(new Option("None", ""));
    for (const lora of list.filter((l) => l.usable && (l.fits.length || !l.problem))) {
      const label = lora.lightning_steps ? `${lora.name} (Lightning, ${lora.lightning_steps} steps)` : lora.name;
      const option = new Option(label, lora.name);
      if (lora.lightning_steps) option.dataset.lightning = String(lora.lightning_steps);
      select.append(option);
    }
    select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "";
    $("lora-row").hidden = select.options.length < 2;
  }

  // A Lightning LoRA runs its own step count without CFG; the fields show what it will use.
  $("loras").addEventListener("change", () => {
    const steps = $("loras").selectedOptions[0]?.dataset.lightning;
    if (!steps) return;
    $("num_inference_steps").value = steps;
    $("true_cfg_scale").value = "1";
  });

  // The ControlNets the Generate mode's model is served with (GET /v1/models), named in the section.
  async function loadControlnets(model) {
    try {
      const card = await (await request(`v1/models/${encodeURIComponent(model)}`)).json();
      $("controlnet-names").textContent = (card.controlnets || []).length ? `(${card.controlnets.join(", ")})` : "";
    } catch { /* only a label */ }
  }

  function showBanner(text) { $("banner").textContent = text; $("banner").hidden = false; }
  function hideBanner() { $("banner").hidden = true; }

  // -- the form -------------------------------------------------------------------------
  function numberOf(id, whole) {
    const input = $(id);
    const text = input.value.trim();
    if (text === "" || (input.validity && input.validity.badInput)) {
      return { error: `${LABELS[id]} must be ${whole ? "a whole number" : "a number"}.` };
    }
    return { value: Number(text) };
  }

  function readForm() {
    const errors = {};
    const body = {};
    body.prompt = $("prompt").value;
    if (!body.prompt.trim()) errors.prompt = "Please write a prompt: describe the image you want.";
    body.negative_prompt = $("negative_prompt").value.trim() ? $("negative_prompt").value : DEFAULTS.negative_prompt;
    body.aspect_ratio = $("aspect_ratio").value;
    for (const [id, whole] of [["num_inference_steps", true], ["true_cfg_scale", false], ["seed", true]]) {
      const { value, error } = numberOf(id, whole);
      if (error) errors[id] = error; else body[id] = value;
    }
    body.language = $("language").value;
    body.add_overlay = $("add_overlay").checked;
    body.save_to_file = $("save_to_file").checked;
    if ($("loras").value && !layering()) {
      const { value, error } = numberOf("lora_scale", false);
      if (error) errors.lora_scale = error;
      else body.loras = [{ name: $("loras").value, scale: value }];
    }
    // The pictures themselves are added when the request is sent (they are not settings to keep).
    if (generating() && startFile) body.strength = Number($("strength").value);
    if (generating() && controlFile) {
      for (const id of ["controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end"]) {
        const { value, error } = numberOf(id, false);
        if (error) errors[id] = error; else body[id] = value;
      }
    }
    if (layering()) {
      const { value, error } = numberOf("layers", true);
      if (error) errors.layers = error; else body.layers = value;
      body.resolution = Number($("resolution").value);
    }
    return { body, errors };
  }

  function applySettings(settings) {
    if (!settings) return;
    if (typeof settings.prompt === "string") $("prompt").value = settings.prompt;
    if (typeof settings.negative_prompt === "string") $("negative_prompt").value = settings.negative_prompt.trim() ? settings.negative_prompt : "";
    if (settings.aspect_ratio && [...$("aspect_ratio").options].some((o) => o.value === settings.aspect_ratio)) {
      $("aspect_ratio").value = settings.aspect_ratio;
    }
    for (const id of ["num_inference_steps", "true_cfg_scale", "seed"]) {
      if (typeof settings[id] === "number") $(id).value = String(settings[id]);
    }
    if (settings.language) $("language").value = settings.language;
    if (typeof settings.add_overlay === "boolean") $("add_overlay").checked = settings.add_overlay;
    if (typeof settings.save_to_file === "boolean") $("save_to_file").checked = settings.save_to_file;
    if (typeof settings.strength === "number") { $("strength").value = String(settings.strength); showStrength(); }
    for (const id of ["controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end", "layers"]) {
      if (typeof settings[id] === "number") $(id).value = String(settings[id]);
    }
    if (settings.resolution) $("resolution").value = String(settings.resolution);
    const lora = Array.isArray(settings.loras) ? settings.loras[0] : null;
    if (lora && [...$("loras").options].some((o) => o.value === lora.name)) {
      $("loras").value = lora.name;
      $("lora_scale").value = String(lora.scale);
    } else if (settings.prompt !== undefined) {
      $("loras").value = "";
    }
    clearFieldErrors();
  }

  /** The page's field for a parameter the API names, in the current mode (null: none). */
  function fieldOf(param) {
    param = (param || "").replace(/^loras\[\d+\]\.scale$/, "lora_scale").replace(/^loras\[\d+\]\.name$/, "loras")
      .replace(/\[\d+\]$/, ""); // image[1] -> image
    if (mode() === "generate" && param === "mask" && task() === "controlnet-inpaint") param = "control_mask";
    param = PARAM_FIELDS[mode()][param] || param;
    return FIELDS.includes(param) ? param : null;
  }

  function fieldError(param, message) {
    const id = fieldOf(param);
    if (!id) return false;
    const note = $(`${id}-error`);
    note.textContent = message;
    note.hidden = false;
    $(id).setAttribute("aria-invalid", "true");
    return id;
  }

  function clearFieldErrors() {
    for (const id of FIELDS) {
      const note = $(`${id}-error`);
      if (note) { note.hidden = true; note.textContent = ""; }
      $(id)?.removeAttribute("aria-invalid");
    }
    $("form-error").hidden = true;
  }

  function formError(message) {
    $("form-error").textContent = message;
    $("form-error").hidden = false;
  }

  for (const id of FIELDS) {
    $(id)?.addEventListener("input", () => {
      $(id).removeAttribute("aria-invalid");
      const note = $(`${id}-error`);
      if (note) note.hidden = true;
    });
  }

  // Enter generates; Shift+Enter is a new line; never while an IME is composing (Chinese input).
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  $("random-seed").addEventListener("click", () => {
    $("seed").value = String(crypto.getRandomValues(new Uint32Array(1))[0]);
    $("seed").dispatchEvent(new Event("input"));
  });

  $("reset-defaults").addEventListener("click", () => {
    applySettings({ ...DEFAULTS, prompt: $("prompt").value });
    local.remove(SETTINGS_ITEM);
  });

  // -- plain-words errors --------------------------------------------------------------
  function plainFieldMessage(err) {
    const label = LABELS[fieldOf(err.param)] || err.param;
    let text = err.message.replace(/^Invalid value for '[^']*':\s*/, "").replace(/\.$/, "");
    if (err.param === "prompt" && /prompt|short|least/i.test(text)) return "Please write a prompt: describe the image you want.";
    text = text.replace(/^Value error,\s*/, "");
    if (/^Input should be /.test(text)) return `${label} ${text.replace(/^Input should be /, "must be ")}.`;
    return `${label}: ${text}.`;
  }

  function plainError(err) {
    if (!(err instanceof ApiError)) return `Something went wrong in the page: ${err.message || err}.`;
    switch (err.status) {
      case 0: return err.message;
      case 400: return err.param && err.param !== "body" ? plainFieldMessage(err) : `The server did not accept the request: ${err.message}`;
      case 404: return "The server no longer knows this job (results are kept for a limited time).";
      case 413: return "The request is too large for the server.";
      case 429: return `The server is busy: its queue is full. Try again in ${err.retryAfter ?? "a few"} seconds.`;
      default:
        if (err.status >= 500) return `The server could not do it: ${err.message}`;
        return err.message;
    }
  }

  // -- status line and progress bar ---------------------------------------------------------
  let countdown = null;

  function setStatus(text, kind = "") {
    clearInterval(countdown);
    countdown = null;
    $("status").textContent = text;
    $("status").className = `status ${kind}`.trim();
  }

  function setProgress(percent, label = "", mode = "") {
    const bar = $("progress");
    const value = Math.max(0, Math.min(100, Math.round(percent)));
    bar.className = `progress ${mode}`.trim();
    bar.setAttribute("aria-valuenow", String(value));
    bar.setAttribute("aria-valuetext", label || `${value}%`);
    $("progress-fill").style.width = `${value}%`;
    $("progress-label").textContent = label;
  }

  function showError(err) {
    const text = plainError(err);
    const field = err instanceof ApiError && err.status === 400 && fieldError(err.param, text);
    if (field) {
      $(field).focus();
    } else {
      formError(text);
    }
    setProgress(0, "", "failed");
    if (err instanceof ApiError && err.status === 429 && err.retryAfter) {
      let left = err.retryAfter;
      setStatus(text, "error");
      countdown = setInterval(() => {
        left -= 1;
        const message = left > 0
          ? `The server is busy: its queue is full. Try again in ${left} second${left === 1 ? "" : "s"}.`
          : "The server may have room again: you can try now.";
        $("status").textContent = message;
        $("form-error").textContent = message;
        if (left <= 0) { clearInterval(countdown); countdown = null; }
      }, 1000);
    } else {
      setStatus(text, "error");
    }
  }

  function showJob(status) {
    const { step, total } = status.progress || { step: 0, total: 0 };
    switch (status.status) {
      case "queued": {
        const ahead = status.queue_position;
        setStatus(ahead === 0 || ahead == null
          ? "Waiting in the queue: yours is next."
          : `Waiting in the queue: ${ahead} job${ahead === 1 ? "" : "s"} ahead of yours (position ${ahead + 1}).`);
        setProgress(0, "Queued", "indeterminate");
        break;
      }
      case "running":
        setStatus(step ? `${editing() ? "Editing" : "Generating"}: step ${step} of ${total}.`
          : `${editing() ? "Editing" : "Generating"}: preparing the prompt…`);
        setProgress(total ? (100 * step) / total : 0, total ? `Step ${step} / ${total} · ${Math.round((100 * step) / total)}%` : "");
        break;
      case "succeeded":
        setProgress(100, `Step ${total} / ${total} · 100%`, "done");
        setStatus("Done: fetching the image…", "ok");
        break;
      case "cancelled":
        setProgress(0, "");
        setStatus("Cancelled: the job was stopped and no image was made.");
        break;
      case "failed":
        setProgress(total ? (100 * step) / total : 0, "", "failed");
        setStatus(`The server could not make this image: ${status.error ? status.error.message : "unknown error"}`, "error");
        break;
      default:
        break;
    }
  }

  // -- jobs -----------------------------------------------------------------------------
  let current = null; // {id, body, controller}

  const VERBS = { generate: ["Generate", "Generating"], edit: ["Edit", "Editing"], layered: ["Split into layers", "Splitting"] };

  function setBusy(busy) {
    $("generate").disabled = busy;
    const [verb, doing] = VERBS[mode()];
    $("generate").textContent = busy ? `${doing}…` : verb;
    $("cancel").hidden = !busy;
    $("cancel").disabled = false;
    // The last result, dimmed while a new one is made.
    for (const id of ["result-figure", "layers-figure"]) $(id).classList.toggle("stale", busy);
  }

  /** Follow the job's SSE stream to its end; reconnects (the first event is the current state,
   * then the newest preview). `preview` events go to onPreview, the others to onStatus. */
  async function watch(id, signal, onStatus, onPreview = () => {}) {
    let failures = 0;
    for (;;) {
      try {
        let last = null;
        for await (const { event, data } of events(`v1/jobs/${encodeURIComponent(id)}/events`, signal)) {
          failures = 0;
          if (event === "preview") {
            onPreview(data);
            continue;
          }
          onStatus(data);
          last = data;
          if (FINAL.has(data.status)) return data;
        }
        // Before /info has named the final states: the server ends a job's stream after its final event.
        if (last && FINAL.size === 0) return last;
      } catch (err) {
        if (signal.aborted || !(err instanceof ApiError) || err.status !== 0) throw err;
        failures += 1;
        if (failures > 5) throw err;
        setStatus("Lost the connection to the server: reconnecting…", "error");
      }
      await sleep(Math.min(500 * 2 ** failures, 5000));
    }
  }

  // -- live preview: the image as it forms, replaced by the final image --------------------
  let previewSize = null; // [width, height] of the job's image

  function showPreview(preview) {
    const image = $("preview-image");
    image.src = `data:${preview.media_type};base64,${preview.b64_json}`;
    if (previewSize) [image.width, image.height] = previewSize;
    $("preview-caption").textContent = `Preview after step ${preview.step} of ${preview.total}`;
    $("preview-figure").hidden = false;
    $("result-figure").hidden = true;
    $("layers-figure").hidden = true;
    $("result-empty").hidden = true;
  }

  function endPreview() {
    if ($("preview-figure").hidden) return;
    $("preview-figure").hidden = true;
    $("preview-image").removeAttribute("src");
    // No new image (cancelled, failed): the panel shows what it showed before.
    showPanel(lastPanel);
  }

  let lastPanel = "empty"; // what the result panel shows when no job runs: empty, result or layers

  function showPanel(which) {
    lastPanel = which;
    $("result-figure").hidden = which !== "result";
    $("layers-figure").hidden = which !== "layers";
    $("result-empty").hidden = which !== "empty";
  }

  async function runJob(id, body) {
    current = { id, body, controller: new AbortController() };
    local.set(PENDING_ITEM, JSON.stringify({ id, body }));
    setBusy(true);
    try {
      const final = await watch(id, current.controller.signal, (status) => {
        previewSize = [status.width, status.height];
        showJob(status);
      }, showPreview);
      if (final.status === "succeeded") await showResult(final, body);
      local.remove(PENDING_ITEM);
    } catch (err) {
      if (err.name !== "AbortError") showError(err);
      if (err instanceof ApiError && err.status === 404) local.remove(PENDING_ITEM);
    } finally {
      current = null;
      endPreview();
      setBusy(false);
    }
  }

  async function generate() {
    if (current) return;
    clearFieldErrors();
    const { body, errors } = readForm();
    const wrong = Object.keys(errors);
    if (wrong.length) {
      for (const id of wrong) fieldError(id, errors[id]);
      setStatus(wrong.length === 1 ? errors[wrong[0]] : "Please fix the highlighted fields.", "error");
      $(wrong[0]).focus();
      return;
    }
    if (editing() && !editImages.length) {
      fieldError("image", "Add the image to edit first (drop it above, or choose a file).");
      setStatus("Add the image to edit first.", "error");
      $("image").focus();
      return;
    }
    if (layering() && !layeredFile) {
      fieldError("layered_image", "Choose the picture to split into layers first.");
      setStatus("Choose the picture to split first.", "error");
      $("layered_image").focus();
      return;
    }
    local.set(SETTINGS_ITEM, JSON.stringify(body));
    if (layering()) {
      await splitLayers(body);
      return;
    }
    setBusy(true);
    setStatus("Sending the request…");
    setProgress(0, "", "indeterminate");
    let job;
    try {
      const response = editing()
        ? await request("v1/jobs/edit", { method: "POST", body: await editForm(body) })
        : await request("v1/jobs", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          // Latent previews cost next to nothing: the image fills in at every step.
          body: JSON.stringify({ ...body, ...(await pictureFields()), preview: "latent" }),
        });
      job = await response.json();
      if (editing()) body.mode = "edit";
      else body.task = task();
    } catch (err) {
      setBusy(false);
      showError(err);
      return;
    }
    showJob(job);
    await runJob(job.id, body);
  }

  // -- Edit mode: 1-3 images by drag-and-drop or file choice, an optional painted mask -------
  const MAX_EDIT_IMAGES = 3;
  let editImages = []; // File objects, in order; the first sets the size and takes the mask
  let maskPainted = false;
  const editing = () => $("mode-edit").checked;
  const layering = () => $("mode-layered").checked;
  const generating = () => !editing() && !layering();
  const mode = () => (editing() ? "edit" : layering() ? "layered" : "generate");

  function setMode() {
    const edit = editing();
    const layered = layering();
    $("edit-fields").hidden = !edit;
    $("layered-fields").hidden = !layered;
    $("start-fields").hidden = edit || layered;
    $("control-fields").classList.toggle("off-mode", edit || layered);
    // The first image (edit) or the picture (layers) sets the size.
    $("ratio-row").querySelector("#aspect_ratio").closest(".field").hidden = edit || layered;
    // Layers come from the OpenAI edits route: no info strip, no file on the server, no LoRA.
    for (const id of ["add_overlay", "save_to_file"]) $(id).closest(".field").hidden = layered;
    $("lora-row").classList.toggle("off-mode", layered);
    if (!current) $("generate").textContent = VERBS[mode()][0];
    $("result-empty").querySelector("p").textContent = edit ? "Your edited image appears here."
      : layered ? "The layers appear here." : "Your image appears here.";
    clearFieldErrors();
  }
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", setMode);

  function addImages(files) {
    const images = [...files].filter((f) => f.type.startsWith("image/") || f.type === "");
    const room = MAX_EDIT_IMAGES - editImages.length;
    if (images.length > room) {
      fieldError("image", `At most ${MAX_EDIT_IMAGES} images: ${images.length - room} not added.`);
    } else {
      $("image-error").hidden = true;
    }
    const firstChanged = editImages.length === 0 && images.length > 0;
    editImages = [...editImages, ...images.slice(0, Math.max(room, 0))];
    showEditImages(firstChanged);
  }

  function showEditImages(firstChanged) {
    const list = $("edit-images");
    list.replaceChildren();
    editImages.forEach((file, index) => {
      const item = document.createElement("li");
      const img = document.createElement("img");
      img.src = URL.createObjectURL(file);
      img.alt = `Image ${index + 1}: ${file.name}`;
      img.onload = () => URL.revokeObjectURL(img.src);
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "icon-button";
      remove.textContent = "×";
      remove.setAttribute("aria-label", `Remove image ${index + 1}`);
      remove.addEventListener("click", () => {
        editImages.splice(index, 1);
        showEditImages(index === 0);
      });
      item.append(img, remove);
      list.append(item);
    });
    // A mask belongs to the first image, and edits one image only.
    $("mask-editor").hidden = editImages.length !== 1;
    if (firstChanged || editImages.length !== 1) resetMask();
  }

  function resetMask() {
    maskPainted = false;
    const image = $("mask-image");
    if (image.src) URL.revokeObjectURL(image.src);
    if (!editImages.length) { image.removeAttribute("src"); return; }
    image.onload = () => {
      const canvas = $("mask");
      canvas.width = image.naturalWidth;
      canvas.height = image.naturalHeight;
      canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    };
    image.src = URL.createObjectURL(editImages[0]);
  }

  const drop = $("drop-zone");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    addImages(event.dataTransfer?.files || []);
  });
  $("image").addEventListener("change", () => {
    addImages($("image").files);
    $("image").value = ""; // choosing the same file again adds it again
  });

  // A mask canvas has its picture's own pixel size; strokes are opaque, shown at half opacity by
  // CSS. Painted = the area to change. (The edit mask and the inpainting mask work alike.)
  function painter(canvas, brush, onPaint) {
    let painting = false;
    function paintAt(event) {
      const box = canvas.getBoundingClientRect();
      const scale = canvas.width / box.width;
      const ctx = canvas.getContext("2d");
      ctx.fillStyle = "#ff2d55";
      ctx.beginPath();
      ctx.arc((event.clientX - box.left) * scale, (event.clientY - box.top) * scale,
        (Number(brush.value) / 2) * scale, 0, 2 * Math.PI);
      ctx.fill();
      onPaint();
    }
    canvas.addEventListener("pointerdown", (event) => {
      painting = true;
      canvas.setPointerCapture(event.pointerId);
      paintAt(event);
    });
    canvas.addEventListener("pointermove", (event) => { if (painting) paintAt(event); });
    for (const end of ["pointerup", "pointercancel"]) canvas.addEventListener(end, () => { painting = false; });
  }
  const clearCanvas = (canvas) => canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);

  painter($("mask"), $("brush"), () => { maskPainted = true; });
  $("mask-clear").addEventListener("click", () => {
    clearCanvas($("mask"));
    maskPainted = false;
  });

  /** OpenAI's mask: opaque everywhere, transparent where painted (the area to change). */
  function maskBlob(painted = $("mask")) {
    const out = document.createElement("canvas");
    out.width = painted.width;
    out.height = painted.height;
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, out.width, out.height);
    ctx.globalCompositeOperation = "destination-out";
    ctx.drawImage(painted, 0, 0);
    return new Promise((resolve) => out.toBlob(resolve, "image/png"));
  }

  async function editForm(body) {
    const data = new FormData();
    for (const [name, value] of Object.entries(body)) {
      if (name === "loras") data.append(name, JSON.stringify(value)); // a list, as JSON text
      else if (name !== "aspect_ratio") data.append(name, String(value));
    }
    data.append("preview", "latent");
    for (const file of editImages) data.append("image", file, file.name || "image.png");
    if (editImages.length === 1 && maskPainted) data.append("mask", await maskBlob(), "mask.png");
    return data;
  }

  // -- Generate mode: a picture to start from (image-to-image; with a mask, inpainting) -------
  let startFile = null;
  let startMaskFile = null; // an uploaded mask: it replaces the painted one
  let startPainted = false;
  let strengthTouched = false; // until the slider is moved, it shows the API's default

  function showStrength() { $("strength-value").textContent = Number($("strength").value).toFixed(2); }
  $("strength").addEventListener("input", () => { strengthTouched = true; showStrength(); });

  const startMasked = () => Boolean(startMaskFile || startPainted);

  /** What a Generate request does, as the gallery names it. */
  function task() {
    if (controlFile) return !startFile && controlMasked() ? "controlnet-inpaint" : "controlnet";
    if (startFile) return startMasked() ? "inpaint" : "image-to-image";
    return "text";
  }

  // The API's default strength is 0.6, or 1 with a mask (repaint the area): the slider follows.
  function maskChanged() {
    if (strengthTouched) return;
    $("strength").value = startMasked() ? "1" : "0.6";
    showStrength();
  }

  function showPicked(image, file, onLoad) {
    if (image.src) URL.revokeObjectURL(image.src);
    if (!file) { image.removeAttribute("src"); return; }
    image.onload = () => onLoad && onLoad(image);
    image.src = URL.createObjectURL(file);
  }

  $("start_image").addEventListener("change", () => {
    const file = $("start_image").files[0];
    if (!file) return;
    startFile = file;
    startMaskFile = null;
    $("start_mask").value = "";
    startPainted = false;
    showPicked($("start-preview"), file, (image) => {
      const canvas = $("start-mask");
      canvas.width = image.naturalWidth;
      canvas.height = image.naturalHeight;
      clearCanvas(canvas);
    });
    $("start-picked").hidden = false;
    maskChanged();
  });
  $("start-remove").addEventListener("click", () => {
    startFile = null;
    startMaskFile = null;
    startPainted = false;
    $("start_image").value = "";
    $("start_mask").value = "";
    showPicked($("start-preview"), null);
    $("start-picked").hidden = true;
    maskChanged();
    $("start_image").focus();
  });
  $("start_mask").addEventListener("change", () => {
    startMaskFile = $("start_mask").files[0] || null;
    maskChanged();
  });
  painter($("start-mask"), $("start-brush"), () => {
    if (startPainted) return;
    startPainted = true;
    maskChanged();
  });
  $("start-mask-clear").addEventListener("click", () => {
    clearCanvas($("start-mask"));
    startPainted = false;
    maskChanged();
  });

  // -- Generate mode: a ControlNet's control image (shown when the model has a ControlNet) ----
  let controlFile = null;
  const CONTROL_HELP = $("control_image-help").textContent;

  /** The control image must have the output's exact size: choose the aspect ratio of that size. */
  function matchRatio(width, height) {
    const select = $("aspect_ratio");
    const name = [...select.options].map((o) => o.value)
      .find((n) => ratios[n] && ratios[n][0] === width && ratios[n][1] === height);
    if (name) select.value = name;
    $("control_image-help").textContent = name
      ? `${width} × ${height}: the aspect ratio ${name} makes images of this size.`
      : `${width} × ${height}: no aspect ratio makes images of this size (the control image must have the image's exact size).`;
  }

  // ControlNet inpainting (when the model has an inpainting ControlNet: /info's task
  // "controlnet-inpaint"): a mask painted on the control image, or uploaded, and no picture to
  // start from; the API then repaints the masked area of the control image.
  let controlInpaint = false;
  let controlMaskFile = null; // an uploaded mask: it replaces the painted one
  let controlPainted = false;
  const controlMasked = () => controlInpaint && Boolean(controlMaskFile || controlPainted);

  function showControlInpaint() {
    $("control-inpaint").hidden = !(controlInpaint && controlFile);
  }

  function resetControlMask() {
    controlMaskFile = null;
    controlPainted = false;
    $("control_mask").value = "";
    clearCanvas($("control-mask"));
  }

  $("control_image").addEventListener("change", () => {
    const file = $("control_image").files[0];
    if (!file) return;
    controlFile = file;
    resetControlMask();
    showPicked($("control-preview"), file, (image) => matchRatio(image.naturalWidth, image.naturalHeight));
    showPicked($("control-mask-preview"), file, (image) => {
      const canvas = $("control-mask");
      canvas.width = image.naturalWidth;
      canvas.height = image.naturalHeight;
      clearCanvas(canvas);
    });
    $("control-picked").hidden = false;
    showControlInpaint();
  });

  function removeControl() {
    controlFile = null;
    $("control_image").value = "";
    showPicked($("control-preview"), null);
    showPicked($("control-mask-preview"), null);
    resetControlMask();
    $("control-picked").hidden = true;
    showControlInpaint();
    $("control_image-help").textContent = CONTROL_HELP;
  }
  $("control_mask").addEventListener("change", () => { controlMaskFile = $("control_mask").files[0] || null; });
  painter($("control-mask"), $("control-brush"), () => { controlPainted = true; });
  $("control-mask-clear").addEventListener("click", () => {
    clearCanvas($("control-mask"));
    controlPainted = false;
  });
  $("control-remove").addEventListener("click", () => { removeControl(); $("control_image").focus(); });

  function base64Of(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result).slice(String(reader.result).indexOf(",") + 1));
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    });
  }

  /** The pictures of a Generate request, as the API's base64 fields. */
  async function pictureFields() {
    const fields = {};
    if (startFile) {
      fields.image = await base64Of(startFile);
      if (startMaskFile) fields.mask = await base64Of(startMaskFile);
      else if (startPainted) fields.mask = await base64Of(await maskBlob($("start-mask")));
    }
    if (controlFile) fields.control_image = await base64Of(controlFile);
    if (task() === "controlnet-inpaint") {
      fields.mask = await base64Of(controlMaskFile || await maskBlob($("control-mask")));
    }
    return fields;
  }

  // -- Layers mode: one picture into RGBA layers (the layered model, on the OpenAI edits route) --
  let layeredFile = null;
  let layeredModel = null; // its name, from /info
  const layerUrls = [];

  $("layered_image").addEventListener("change", () => {
    layeredFile = $("layered_image").files[0] || null;
    showPicked($("layered-preview"), layeredFile);
    $("layered-preview").hidden = !layeredFile;
  });

  async function splitLayers(body) {
    const data = new FormData();
    data.append("model", layeredModel || "layered");
    for (const name of ["prompt", "negative_prompt", "num_inference_steps", "true_cfg_scale", "seed",
      "language", "layers"]) data.append(name, String(body[name]));
    // The default bucket is not sent: the server reads a form's `resolution` as text, which its
    // 640-or-1024 check refuses (a 400 naming `resolution`) until it converts form text to a number.
    if (body.resolution !== 640) data.append("resolution", String(body.resolution));
    data.append("image", layeredFile, layeredFile.name || "picture.png");
    current = { id: null, body, layered: true, controller: new AbortController() };
    setBusy(true);
    // This route has no job, so no step events: the bar only says that it works.
    setStatus(`Splitting the picture into ${body.layers} layers…`);
    setProgress(0, "Working…", "indeterminate");
    const started = performance.now();
    try {
      const response = await request("v1/images/edits", { method: "POST", body: data, signal: current.controller.signal });
      showLayers(await response.json(), body, (performance.now() - started) / 1000);
    } catch (err) {
      if (err.name !== "AbortError") showError(err);
      else { // the server cancels a request whose client goes away
        setProgress(0, "");
        setStatus("Cancelled: the picture was not split.");
      }
    } finally {
      current = null;
      setBusy(false);
    }
  }

  function blobOf(b64, type) {
    return new Blob([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], { type });
  }

  /** The layers side by side (each with its download link) and stacked, the first at the bottom. */
  function showLayers(answer, body, seconds) {
    for (const url of layerUrls.splice(0)) URL.revokeObjectURL(url);
    const list = $("layers-list");
    const stack = $("layers-stack");
    list.replaceChildren();
    stack.replaceChildren();
    const count = answer.data.length;
    answer.data.forEach((item, index) => {
      const url = URL.createObjectURL(blobOf(item.b64_json, "image/png"));
      layerUrls.push(url);
      const li = document.createElement("li");
      const img = document.createElement("img");
      img.src = url;
      img.alt = `Layer ${index + 1} of ${count}`;
      img.className = "checker";
      const link = document.createElement("a");
      link.href = url;
      link.download = `qwen-image-layer-${body.seed}-${index + 1}.png`;
      link.className = "button secondary";
      link.textContent = `Download layer ${index + 1}`;
      li.append(img, link);
      list.append(li);
      const layer = document.createElement("img"); // stacked: later layers over earlier ones
      layer.src = url;
      layer.alt = "";
      stack.append(layer);
    });
    const [width, height] = String(answer.size || "").split("x").map(Number);
    if (width && height) stack.style.aspectRatio = `${width} / ${height}`;
    $("layers-meta").textContent = [`${count} layers`, width && height ? `${width} × ${height}` : null,
      `seed ${body.seed}`, `${body.num_inference_steps} steps`, `${seconds.toFixed(2)} s`].filter(Boolean).join(" · ");
    $("layers-prompt").textContent = body.prompt;
    showPanel("layers");
    setProgress(100, "Done", "done");
    setStatus(`Done: ${count} layers in ${seconds.toFixed(2)} s.`, "ok");
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });

  $("cancel").addEventListener("click", async () => {
    if (!current) return;
    if (current.layered) { // no job: the server cancels the request when its client goes away
      current.controller.abort();
      return;
    }
    const { id } = current;
    $("cancel").disabled = true;
    setStatus("Cancelling…");
    try {
      const status = await (await request(`v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" })).json();
      if (current && current.id === id && FINAL.has(status.status)) showJob(status);
      // Otherwise the event stream reports "cancelled" as soon as the server has stopped the job.
    } catch (err) {
      showError(err);
      if (current && current.id === id) $("cancel").disabled = false;
    }
  });

  // -- results and the gallery (IndexedDB: blobs, so images outlive the server's TTL) --------
  const urls = new Map(); // job id -> object URL
  let memoryGallery = null; // fallback when IndexedDB is not available
  let shown = null; // the item in the result panel
  let viewing = null; // the item in the viewer

  const dbPromise = new Promise((resolve) => {
    try {
      const open = indexedDB.open(STORE, 1);
      open.onupgradeneeded = () => open.result.createObjectStore("results", { keyPath: "id" });
      open.onsuccess = () => resolve(open.result);
      open.onerror = () => resolve(null);
      open.onblocked = () => resolve(null);
    } catch {
      resolve(null);
    }
  });

  function idb(mode, work) {
    return dbPromise.then((db) => new Promise((resolve, reject) => {
      const tx = db.transaction("results", mode);
      const result = work(tx.objectStore("results"));
      tx.oncomplete = () => resolve(result && "result" in result ? result.result : undefined);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    }));
  }

  async function galleryItems() {
    const db = await dbPromise;
    if (!db) return (memoryGallery ||= []).slice();
    const items = await idb("readonly", (store) => store.getAll());
    return items.sort((a, b) => b.created - a.created);
  }

  async function galleryPut(item) {
    const db = await dbPromise;
    if (!db) {
      memoryGallery = [item, ...(memoryGallery || []).filter((i) => i.id !== item.id)].slice(0, MAX_GALLERY);
      $("gallery-note").textContent = "This browser does not allow storage here: images are kept until you close the page.";
      return;
    }
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        await idb("readwrite", (store) => store.put(item));
        break;
      } catch (err) {
        const items = await galleryItems(); // storage full: drop the oldest few and retry
        if (err?.name !== "QuotaExceededError" || items.length < 2) {
          $("gallery-note").textContent = "Could not keep this image in the browser (storage is full or blocked).";
          return;
        }
        for (const old of items.slice(-5)) await galleryDelete(old.id);
      }
    }
    const items = await galleryItems();
    for (const old of items.slice(MAX_GALLERY)) await galleryDelete(old.id);
  }

  async function galleryDelete(id) {
    const db = await dbPromise;
    if (!db) memoryGallery = (memoryGallery || []).filter((i) => i.id !== id);
    else await idb("readwrite", (store) => store.delete(id));
    if (urls.has(id) && shown?.id !== id) { URL.revokeObjectURL(urls.get(id)); urls.delete(id); }
  }

  function urlOf(item) {
    if (!urls.has(item.id)) urls.set(item.id, URL.createObjectURL(item.blob));
    return urls.get(item.id);
  }

  const TASK_NAMES = { "image-to-image": "Image-to-image", inpaint: "Inpainting", controlnet: "ControlNet",
    "controlnet-inpaint": "ControlNet inpainting" };

  function describe(item) {
    const parts = [`${item.width} × ${item.height}`, `seed ${item.seed}`];
    if (item.body?.mode === "edit") parts.unshift("Edit");
    if (TASK_NAMES[item.body?.task]) parts.unshift(TASK_NAMES[item.body.task]);
    if (item.body?.num_inference_steps) parts.push(`${item.body.num_inference_steps} steps`);
    if (typeof item.inference_time === "number") parts.push(`${item.inference_time.toFixed(2)} s`);
    if (typeof item.queue_time === "number" && item.queue_time >= 0.5) parts.push(`${item.queue_time.toFixed(1)} s in queue`);
    return parts.join(" · ");
  }

  function fileName(item) {
    return `qwen-image-${item.seed}-${item.id.slice(0, 8)}.png`;
  }

  async function showResult(status, body) {
    const response = await request(`v1/jobs/${encodeURIComponent(status.id)}/image`);
    const blob = await response.blob();
    const item = {
      id: status.id, created: Date.now(), body, blob,
      width: status.width, height: status.height, seed: status.seed,
      inference_time: status.inference_time, queue_time: status.queue_time, file_path: status.file_path,
    };
    shown = item;
    const url = urlOf(item);
    const image = $("result-image");
    image.src = url;
    image.alt = `Generated image for: ${body.prompt}`;
    image.width = item.width;
    image.height = item.height;
    $("result-meta").textContent = describe(item);
    $("result-prompt").textContent = body.prompt + (item.file_path ? ` (saved on the server as ${item.file_path})` : "");
    $("result-download").href = url;
    $("result-download").download = fileName(item);
    showPanel("result");
    setStatus(`Done in ${typeof item.inference_time === "number" ? item.inference_time.toFixed(2) + " s" : "a moment"}.`, "ok");
    await galleryPut(item);
    await renderGallery();
  }

  async function renderGallery() {
    let items;
    try {
      items = await galleryItems();
    } catch {
      $("gallery-note").textContent = "Could not read the saved images from this browser's storage.";
      return;
    }
    const list = $("gallery");
    list.replaceChildren();
    for (const item of items) {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "image-button";
      button.setAttribute("aria-label", `Enlarge: ${item.body?.prompt || "image"}`);
      const img = document.createElement("img");
      img.src = urlOf(item);
      img.alt = item.body?.prompt || "";
      img.loading = "lazy";
      button.append(img);
      button.addEventListener("click", () => openViewer(item));
      const caption = document.createElement("p");
      caption.className = "caption";
      caption.textContent = item.body?.prompt || "";
      caption.title = `${item.body?.prompt || ""}\n${describe(item)}`;
      li.append(button, caption);
      list.append(li);
    }
    $("gallery-count").textContent = items.length ? `(${items.length})` : "";
    $("gallery-clear").hidden = !items.length;
    if (!items.length && !memoryGallery) $("gallery-note").textContent = "Nothing yet. Images you make here are kept in this browser only.";
    else if (!memoryGallery) $("gallery-note").textContent = "Kept in this browser only. Click an image to enlarge it.";
  }

  function openViewer(item) {
    viewing = item;
    const url = urlOf(item);
    $("viewer-image").src = url;
    $("viewer-image").alt = item.body?.prompt || "";
    $("viewer-meta").textContent = describe(item);
    $("viewer-prompt").textContent = item.body?.prompt || "";
    $("viewer-download").href = url;
    $("viewer-download").download = fileName(item);
    $("viewer").showModal();
  }

  function reuse(item) {
    if (!item) return;
    applySettings(item.body);
    setStatus("Settings loaded from the image: change what you like and press Generate.");
    $("prompt").focus();
  }

  $("result-open").addEventListener("click", () => shown && openViewer(shown));
  $("result-reuse").addEventListener("click", () => reuse(shown));
  $("viewer-reuse").addEventListener("click", () => { $("viewer").close(); reuse(viewing); });
  $("viewer-delete").addEventListener("click", async () => {
    if (!viewing) return;
    $("viewer").close();
    await galleryDelete(viewing.id);
    viewing = null;
    await renderGallery();
  });
  $("viewer").addEventListener("click", (event) => { // a click on the backdrop closes it
    if (event.target === $("viewer")) $("viewer").close();
  });
  $("gallery-clear").addEventListener("click", async () => {
    if (!window.confirm("Delete every image kept in this browser?")) return;
    for (const item of await galleryItems()) await galleryDelete(item.id);
    await renderGallery();
  });

  // -- start -----------------------------------------------------------------------------
  fillRatios(FALLBACK_RATIOS, Object.keys(FALLBACK_RATIOS));
  applySettings({ ...DEFAULTS, ...(local.json(SETTINGS_ITEM) || {}), prompt: "" });
  loadInfo();
  renderGallery();
  const pending = local.json(PENDING_ITEM); // a job still running when the page was closed
  if (pending && pending.id) {
    applySettings(pending.body);
    setStatus("Resuming the job started before the page was reloaded…");
    runJob(pending.id, pending.body);
  }
})();
