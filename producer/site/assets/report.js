// vitscope report filters. The page is complete without this script: it only hides what does not match.
// A job (one model's row) shows when its model, top-1 class and state match; an image shows when its
// name or id contains the search text and at least one of its jobs shows. Images on other pages whose
// name or id match the search are listed as links (from assets/search-index.js).
"use strict";
(function () {
  const form = document.getElementById("filters");
  if (!form) return;
  form.hidden = false;
  const images = Array.from(document.querySelectorAll("article.image"));
  const here = decodeURIComponent(location.pathname.split("/").pop()) || "index.html";
  const elsewhere = document.getElementById("elsewhere");
  const MAX_ELSEWHERE = 20;

  function listElsewhere(query) {
    elsewhere.replaceChildren();
    const index = window.vitscopeIndex || [];
    const found = query ? index.filter((e) => e[2] !== here && (e[0] + " " + e[1]).toLowerCase().includes(query)) : [];
    elsewhere.hidden = found.length === 0;
    if (!found.length) return;
    elsewhere.append("On other pages: ");
    for (const [name, id, page, line] of found.slice(0, MAX_ELSEWHERE)) {
      const link = document.createElement("a");
      link.href = page + "#row-" + line;
      link.textContent = name + (id ? " (" + id + ")" : "");
      link.dir = "auto"; // isolated from the page's direction, like the names on the pages
      elsewhere.append(link);
    }
    if (found.length > MAX_ELSEWHERE) elsewhere.append("… " + (found.length - MAX_ELSEWHERE) + " more");
  }

  function apply() {
    const model = form.elements.model.value;
    const cls = form.elements.class.value;
    const state = form.elements.state.value;
    const query = form.elements.q.value.trim().toLowerCase();
    let shown = 0;
    for (const image of images) {
      const text = (image.dataset.name + " " + image.dataset.id).toLowerCase();
      const named = !query || text.includes(query);
      let any = false;
      for (const job of image.querySelectorAll("section.job")) {
        const match = named && (!model || job.dataset.model === model) &&
          (!cls || job.dataset.class === cls) && (!state || job.dataset.state === state);
        job.hidden = !match;
        any = any || match;
      }
      image.hidden = !any;
      if (any) shown += 1;
    }
    form.elements.shown.value = shown + " of " + images.length + " images on this page";
    listElsewhere(query);
  }

  form.addEventListener("input", apply);
  form.addEventListener("submit", function (event) { event.preventDefault(); });
  apply();
})();
