// The chat playground: posts the conversation to the page's session-authenticated stream endpoint (which proxies
// to the inference server) and appends the OpenAI-style server-sent-event deltas as they arrive.
(function () {
  "use strict";
  const form = document.getElementById("chat-form");
  if (!form) return;
  const log = document.getElementById("chat-log");
  const input = document.getElementById("chat-input");
  const send = document.getElementById("chat-send");
  const stopButton = document.getElementById("chat-stop");
  const history = [];
  let controller = null;

  function csrfToken() {
    const field = form.querySelector("input[name=csrfmiddlewaretoken]");
    return field ? field.value : "";
  }

  function bubble(role, text) {
    const hint = document.getElementById("chat-empty");
    if (hint) hint.remove();
    const div = document.createElement("div");
    div.className = "msg " + role;
    div.textContent = text;
    log.appendChild(div);
    div.scrollIntoView({block: "end"});
    return div;
  }

  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          onEvent(JSON.parse(data));
        }
      }
    }
  }

  // While waiting: a spinner with the seconds so far; after: time to the first token, total time and tokens/s
  // (tokens from the stream's usage chunk, else the number of deltas received).
  function startTimer(answer) {
    const stats = document.createElement("div");
    stats.className = "chat-stats";
    stats.setAttribute("role", "status");
    answer.after(stats);
    const started = performance.now();
    const timer = {started: started, first: null, deltas: 0, usage: null, stats: stats};
    function tick() {
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      stats.innerHTML = '<span class="spinner" aria-hidden="true"></span> ' +
        (timer.first === null ? "waiting for the first token… " : "generating… ") + seconds + " s";
    }
    tick();
    timer.interval = setInterval(tick, 100);
    return timer;
  }

  function stopTimer(timer, outcome) {
    clearInterval(timer.interval);
    const total = (performance.now() - timer.started) / 1000;
    const tokens = timer.usage && timer.usage.completion_tokens ? timer.usage.completion_tokens : timer.deltas;
    const parts = [];
    if (timer.first !== null) parts.push("first token after " + ((timer.first - timer.started) / 1000).toFixed(2) + " s");
    parts.push(tokens + " token" + (tokens === 1 ? "" : "s") + " in " + total.toFixed(2) + " s");
    if (tokens > 0 && timer.first !== null) {
      const generating = Math.max((performance.now() - timer.first) / 1000, 1e-3);
      parts.push((tokens > 1 ? ((tokens - 1) / generating) : tokens / total).toFixed(1) + " tokens/s");
    }
    if (outcome) parts.push(outcome);
    timer.stats.textContent = parts.join(" · ");
    timer.stats.dataset.done = "true";
  }

  async function ask() {
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    history.push({role: "user", content: text});
    bubble("user", text);
    const answer = bubble("assistant", "");
    answer.dataset.deltas = "0";
    answer.dataset.done = "false";
    const timer = startTimer(answer);
    let outcome = "";
    const system = document.getElementById("chat-system").value.trim();
    const messages = (system ? [{role: "system", content: system}] : []).concat(history);
    send.disabled = true;
    stopButton.disabled = false;
    controller = new AbortController();
    try {
      const response = await fetch(form.dataset.streamUrl, {
        method: "POST",
        headers: {"Content-Type": "application/json", "X-CSRFToken": csrfToken()},
        body: JSON.stringify({
          messages: messages,
          max_tokens: Number(document.getElementById("chat-max-tokens").value) || 128,
          temperature: Number(document.getElementById("chat-temperature").value) || 0,
        }),
        signal: controller.signal,
        credentials: "same-origin",
      });
      if (!response.ok) {
        let message = response.status + " " + response.statusText;
        try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
        throw new Error(message);
      }
      await readEvents(response, function (event) {
        if (event.error) throw new Error(event.error.message);
        if (event.usage) timer.usage = event.usage;
        const choice = (event.choices || [])[0];
        const delta = choice && choice.delta && choice.delta.content;
        if (delta) {
          if (timer.first === null) timer.first = performance.now();
          timer.deltas += 1;
          answer.textContent += delta;
          answer.dataset.deltas = String(Number(answer.dataset.deltas) + 1);
        }
        if (choice && choice.finish_reason) answer.dataset.finishReason = choice.finish_reason;
      });
      history.push({role: "assistant", content: answer.textContent});
    } catch (error) {
      if (error.name === "AbortError") {
        // Stopped by the user: the part shown stays in the conversation, as it does on the page.
        history.push({role: "assistant", content: answer.textContent});
        outcome = "stopped";
      } else {
        answer.classList.add("error");
        answer.textContent += (answer.textContent ? "\n" : "") + error.message;
        history.pop();  // the failed question is not sent again with the next one
        outcome = "failed";
      }
    } finally {
      stopTimer(timer, outcome);
      answer.dataset.done = "true";
      send.disabled = false;
      stopButton.disabled = true;
      controller = null;
    }
  }

  form.addEventListener("submit", function (event) { event.preventDefault(); ask(); });
  input.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); ask(); }
  });
  stopButton.addEventListener("click", function () { if (controller) controller.abort(); });
  document.getElementById("chat-clear").addEventListener("click", function () {
    history.length = 0;
    log.textContent = "";  // the stats lines go with their answers
  });
})();
