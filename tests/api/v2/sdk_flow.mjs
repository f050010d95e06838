// The documented flow of the official TypeScript SDK (@comfyorg/sdk), run
// unchanged by node against a real comfy-embed server. The SDK reads its
// target from COMFY_BASE_URL and takes the key as `new Comfy({ apiKey })`, as
// its README says (the key comes from COMFY_API_KEY here); COMFY_SDK_ENTRY is the installed package's entry file (scripts/node puts
// it outside the repository). Arguments: photo.png, workflow_api.json (its
// node "1" is a LoadImage, "3" a SaveImage), a long workflow to cancel, and
// a folder for the outputs. Prints one JSON summary line on stdout; the
// Python test (test_sdk_typescript.py) checks it and the files.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const { Comfy } = await import(pathToFileURL(process.env.COMFY_SDK_ENTRY).href);
const [photo, workflowPath, longPath, outDir] = process.argv.slice(2);
const client = new Comfy({ apiKey: process.env.COMFY_API_KEY });

// run: a workflow from a file, an asset from a file set on an input.
const wf = await client.workflows.fromFile(workflowPath);
const asset = client.assets.fromFile(photo);
wf.setInput("1", "image", asset);
const job = await client.run(wf, { timeoutMs: 180_000 });
const [out] = job.getOutputs("3");
await out.toFile(join(outDir, "run.png"));
const head = await out.toBytes({ range: [0, 7] });

// submit then events: the same bytes again are found by hash, not uploaded.
const again = client.assets.fromFile(photo);
const wf2 = client.workflows.fromJson(JSON.parse(readFileSync(workflowPath, "utf-8")));
wf2.setInput("1", "image", again);
const job2 = await client.submit(wf2);
const events = [];
for await (const event of job2.events()) {
  events.push(event.kind === "statusChange" ? `status:${event.status}` : event.kind);
}
await job2.wait(60_000);
writeFileSync(join(outDir, "submit.png"), await job2.getOutputs("3")[0].toBytes());

// the workflow behind a job rehydrated by id.
const behind = await (await client.jobs.get(job.id)).getWorkflow();

// cancel a running job.
const long = await client.submit(
  client.workflows.fromJson(JSON.parse(readFileSync(longPath, "utf-8"))),
);
const deadline = Date.now() + 120_000;
while ((await long.refresh()).status !== "running") {
  if (Date.now() > deadline) throw new Error(`job ${long.id} never ran`);
  await new Promise((resolve) => setTimeout(resolve, 200));
}
await long.cancel();
const afterCancel = long.status;
await long.wait(120_000);

console.log(JSON.stringify({
  job: { id: job.id, status: job.status, outputSize: out.sizeBytes, outputType: out.type },
  head: Array.from(head),
  firstUpload: { createdNew: asset.createdNew, hash: await asset.hash() },
  secondUpload: { createdNew: again.createdNew, hash: await again.hash() },
  job2: { id: job2.id, status: job2.status, events },
  workflow: { format: behind.format, classes: Object.fromEntries(
    Object.entries(behind.workflow).map(([id, node]) => [id, node.class_type])) },
  cancel: { afterCancel, final: long.status },
}));
