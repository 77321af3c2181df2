// The page: the task list and fields come from GET /v1/tasks; answers from POST /v1/{task}.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { tasks: [], image: null, bitmap: null, box: null, drag: null };
const HIDDEN_ARGS = new Set(["image", "num_decodes", "beam_search"]);

function headers() {
  const token = $("token").value || localStorage.getItem("uio-token");
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function apiError(response) {
  if (response.status === 401) $("token-row").hidden = false;
  try {
    const body = await response.json();
    return `${body.error}: ${body.detail}`;
  } catch (err) {
    return `HTTP ${response.status}`;
  }
}

async function loadTasks() {
  const response = await fetch("/v1/tasks", { headers: headers() });
  if (!response.ok) { showError(await apiError(response)); return; }
  state.tasks = await response.json();
  $("task").replaceChildren(...state.tasks.map((task) => new Option(task.name.replaceAll("_", " "), task.name)));
  $("task").value = "vqa";
  renderFields();
}

function currentTask() { return state.tasks.find((task) => task.name === $("task").value); }

function field(arg) {
  const wrap = document.createElement("div");
  const label = document.createElement("label");
  label.htmlFor = `arg-${arg.name}`;
  label.textContent = arg.name.replaceAll("_", " ") + (arg.required ? "" : " (optional)");
  let input = document.createElement("input");
  input.type = "text";
  if (arg.type === "integer") input.type = "number";
  if (arg.type === "boolean") { input.type = "checkbox"; }
  if (arg.type === "list of images") { input.type = "file"; input.multiple = true; input.accept = "image/*"; }
  if (arg.type === "box") { input.placeholder = "x1, y1, x2, y2: drag on the image"; }
  if (arg.type === "list of strings") { input.placeholder = "comma-separated"; }
  input.id = `arg-${arg.name}`;
  input.name = arg.name;
  input.dataset.type = arg.type;
  if (arg.help) input.title = arg.help;
  wrap.append(label, input);
  return wrap;
}

function renderFields() {
  const task = currentTask();
  if (!task) return;
  $("task-help").textContent = task.help;
  const args = task.arguments.filter((arg) => !HIDDEN_ARGS.has(arg.name));
  $("fields").replaceChildren(...args.map(field));
  const takesBox = args.some((arg) => arg.type === "box");
  $("box-hint").hidden = !takesBox;
  if (takesBox && state.box) $("arg-location").value = state.box.map(Math.round).join(", ");
  draw();
}

async function setImage(blob) {
  state.image = blob;
  state.bitmap = await createImageBitmap(blob);
  state.box = null;
  const canvas = $("canvas");
  canvas.width = state.bitmap.width;
  canvas.height = state.bitmap.height;
  canvas.hidden = false;
  $("drop-hint").hidden = true;
  $("drop").classList.add("has-image");
  renderFields();
}

function draw() {
  if (!state.bitmap) return;
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  ctx.drawImage(state.bitmap, 0, 0);
  const boxInput = $("arg-location");
  if (state.box && boxInput) {
    const [x1, y1, x2, y2] = state.box;
    ctx.lineWidth = Math.max(2, canvas.width / 200);
    ctx.strokeStyle = "#ffcc00";
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
  }
}

function imagePoint(event) {
  const canvas = $("canvas");
  const rect = canvas.getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * canvas.width;
  const y = ((event.clientY - rect.top) / rect.height) * canvas.height;
  return [Math.min(Math.max(x, 0), canvas.width), Math.min(Math.max(y, 0), canvas.height)];
}

function setupCanvas() {
  const canvas = $("canvas");
  canvas.addEventListener("pointerdown", (event) => {
    if (!$("arg-location")) return;
    canvas.setPointerCapture(event.pointerId);
    state.drag = imagePoint(event);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!state.drag) return;
    const [x, y] = imagePoint(event);
    const [sx, sy] = state.drag;
    state.box = [Math.min(sx, x), Math.min(sy, y), Math.max(sx, x), Math.max(sy, y)];
    $("arg-location").value = state.box.map(Math.round).join(", ");
    draw();
  });
  canvas.addEventListener("pointerup", () => { state.drag = null; });
}

function setupImageInput() {
  const drop = $("drop");
  $("file").addEventListener("change", () => { if ($("file").files[0]) setImage($("file").files[0]); });
  $("demo").addEventListener("click", async () => setImage(await (await fetch("/static/demo.png")).blob()));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) setImage(file);
  });
}

function formData(task) {
  const data = new FormData();
  const takesImage = task.arguments.some((arg) => arg.name === "image");
  if (takesImage && state.image) data.append("image", state.image, "image.png");
  for (const input of $("fields").querySelectorAll("input")) {
    if (input.type === "file") {
      for (const file of input.files) data.append(input.name, file, file.name);
    } else if (input.type === "checkbox") {
      if (input.checked) data.append(input.name, "true");
    } else if (input.value.trim()) {
      data.append(input.name, input.value.trim());
    }
  }
  if ($("num_decodes").value) data.append("num_decodes", $("num_decodes").value);
  if ($("beam_search").value) data.append("beam_search", $("beam_search").value);
  return data;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function details(record) {
  const list = element("ul");
  for (const box of record.boxes || []) list.append(element("li", "", box.map((v) => v.toFixed(0)).join(", ")));
  for (const point of (record.keypoints || []).filter((k) => k.visibility > 0)) {
    list.append(element("li", "", `${point.name}: ${point.x.toFixed(0)}, ${point.y.toFixed(0)}`));
  }
  if (record.masks !== undefined) list.append(element("li", "", `${record.masks} mask(s)`));
  if (record.invalid) list.append(element("li", "", "the model's output was not well-formed keypoints"));
  return list;
}

function showResult(task, record, inputUrl) {
  const card = element("article", "result");
  const text = element("div");
  text.append(element("h2", "", task.name.replaceAll("_", " ")));
  const meta = `score ${record.score.toFixed(3)} · ${(record.seconds * 1000).toFixed(0)} ms · batch of ${record.batch_size}`;
  text.append(element("p", "meta", meta));
  if (record.text) text.append(element("p", "answer", record.text));
  text.append(details(record));
  const picture = element("img");
  const output = record.output && record.images[record.output];
  picture.src = output ? `data:image/png;base64,${output}` : inputUrl;
  picture.alt = output ? `${task.name} result` : "input image";
  card.append(text);
  if (picture.src) card.append(picture);
  $("results").prepend(card);
}

async function submit(event) {
  event.preventDefault();
  showError("");
  const task = currentTask();
  if ($("token").value) localStorage.setItem("uio-token", $("token").value);
  $("submit").disabled = true;
  $("submit").textContent = "Running…";
  try {
    const inputUrl = state.bitmap ? $("canvas").toDataURL("image/png") : "";
    const response = await fetch(`/v1/${task.name}`, { method: "POST", body: formData(task), headers: headers() });
    if (!response.ok) { showError(await apiError(response)); return; }
    showResult(task, await response.json(), inputUrl);
  } catch (err) {
    showError(`the server cannot be reached (${err.message})`);
  } finally {
    $("submit").disabled = false;
    $("submit").textContent = "Run";
  }
}

$("task").addEventListener("change", renderFields);
$("form").addEventListener("submit", submit);
setupCanvas();
setupImageInput();
loadTasks();
