// Renders /openapi.json as a plain page: no framework, nothing from a CDN.
"use strict";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) {
    if (child == null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function schemaText(schema) {
  if (!schema) return "";
  if (schema.$ref) return schema.$ref.split("/").pop();
  if (schema.type === "array" && schema.items) return schemaText(schema.items) + "[]";
  if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
  if (schema.const !== undefined) return JSON.stringify(schema.const);
  return Array.isArray(schema.type) ? schema.type.join(" | ") : (schema.type || "any");
}

function parameters(op) {
  if (!op.parameters || !op.parameters.length) return null;
  const rows = op.parameters.map((p) => el("tr", {},
    el("td", {}, el("code", {}, p.name)), el("td", {}, p.in + (p.required ? ", required" : "")),
    el("td", {}, el("code", {}, schemaText(p.schema))), el("td", {}, p.description || "")));
  return el("table", {}, el("tr", {}, el("th", {}, "parameter"), el("th", {}, "in"),
    el("th", {}, "type"), el("th", {}, "")), ...rows);
}

function responses(op) {
  const rows = Object.entries(op.responses || {}).map(([code, r]) => {
    const types = Object.entries(r.content || {}).map(([mt, c]) => mt + ": " + schemaText(c.schema));
    return el("tr", {}, el("td", {}, el("code", {}, code)), el("td", {}, r.description || ""),
      el("td", {}, el("code", {}, types.join(", "))));
  });
  return el("table", {}, el("tr", {}, el("th", {}, "status"), el("th", {}, ""), el("th", {}, "body")), ...rows);
}

function render(doc) {
  document.getElementById("title").textContent = doc.info.title + " " + doc.info.version;
  document.getElementById("description").textContent = doc.info.description || "";
  const toc = document.getElementById("toc");
  const ops = document.getElementById("operations");
  ops.textContent = "";
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const id = (method + path).replace(/[^A-Za-z0-9]+/g, "-");
      toc.append(el("a", {href: "#" + id}, method.toUpperCase() + " " + path));
      const body = op.requestBody && op.requestBody.content
        ? el("p", {}, "Body: ", el("code", {}, Object.entries(op.requestBody.content)
            .map(([mt, c]) => mt + ": " + schemaText(c.schema)).join(", "))) : null;
      ops.append(el("section", {class: "op", id: id},
        el("div", {}, el("span", {class: "method " + method}, method), " ", el("span", {class: "path"}, path)),
        el("p", {}, el("strong", {}, op.summary || "")), op.description ? el("p", {}, op.description) : null,
        parameters(op), body, responses(op)));
    }
  }
  const schemas = document.getElementById("schemas");
  schemas.append(el("h2", {}, "Schemas"));
  for (const [name, schema] of Object.entries((doc.components || {}).schemas || {})) {
    schemas.append(el("details", {id: "schema-" + name}, el("summary", {}, name),
      el("pre", {}, JSON.stringify(schema, null, 2))));
  }
}

fetch("/openapi.json").then((r) => r.json()).then(render).catch((e) => {
  document.getElementById("operations").textContent = "Could not load /openapi.json: " + e;
});
