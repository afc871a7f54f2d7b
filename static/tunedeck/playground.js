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

  async function ask() {
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    history.push({role: "user", content: text});
    bubble("user", text);
    const answer = bubble("assistant", "");
    answer.dataset.deltas = "0";
    answer.dataset.done = "false";
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
        const choice = (event.choices || [])[0];
        const delta = choice && choice.delta && choice.delta.content;
        if (delta) {
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
      } else {
        answer.classList.add("error");
        answer.textContent += (answer.textContent ? "\n" : "") + error.message;
        history.pop();  // the failed question is not sent again with the next one
      }
    } finally {
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
    log.textContent = "";
  });
})();
