// Validates Strimzi resources against Strimzi 1.0's CRD schemas (the compiled validators
// of @kubernetes-models/strimzi-kafka-operator). Usage: node validate.mjs NODE_MODULES_DIR
// with a JSON array of resources on stdin; prints a JSON array: per resource, its errors.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
const docs = JSON.parse(readFileSync(0, "utf8"));
const out = [];
for (const doc of docs) {
  const [group, version] = String(doc.apiVersion).split("/");
  const file = join(modules, "@kubernetes-models/strimzi-kafka-operator", group, version,
                    `${doc.kind}.js`);
  let Model;
  try {
    Model = (await import(pathToFileURL(file).href))[doc.kind];
  } catch (e) {
    out.push([`no schema for ${doc.apiVersion} ${doc.kind}: ${e.message}`]);
    continue;
  }
  try {
    new Model(doc).validate();
    out.push([]);
  } catch (e) {
    out.push([e.message]);
  }
}
process.stdout.write(JSON.stringify(out));
