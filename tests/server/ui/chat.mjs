// Drives the server's web page in headless Chromium: send a message, wait for the streamed
// reply, stop a second one mid-stream, reload and find the conversation kept.
// Usage: node chat.mjs URL SCREENSHOT.png   (prints one JSON line of findings)
import { chromium } from "playwright-core";

const [url, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const out = {};
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
  page.setDefaultTimeout(150_000);
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url);
  await page.fill("#system", "You are a terse assistant.");
  await page.fill("#temperature", "0");
  await page.fill("#max_tokens", "8");
  await page.fill("#input", "Say hello.");
  await page.click("#send");
  const reply = page.locator(".msg.assistant .bubble").first();
  await page.waitForSelector("#send:not([disabled])");
  out.reply = await reply.textContent();
  out.model = await page.textContent("#model");

  // A long reply, stopped after its first words.
  await page.fill("#system", "");
  await page.fill("#max_tokens", "400");
  await page.fill("#input", "Count from 1 to 300, separated by commas.");
  await page.click("#send");
  await page.waitForFunction(() =>
    document.querySelector(".msg.streaming .bubble")?.textContent.length > 5);
  await page.click("#stop");
  await page.waitForSelector("#send:not([disabled])", { timeout: 10_000 });
  out.stop_disabled = await page.isDisabled("#stop");
  out.stopped = await page.locator(".msg.assistant .bubble").nth(1).textContent();
  await page.screenshot({ path: screenshot });

  await page.reload();
  out.bubbles_after_reload = await page.locator(".msg").count();
  out.page_errors = errors;
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
