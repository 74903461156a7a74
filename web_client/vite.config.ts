import { defineConfig } from "vite";

// The server (`sg2 serve`) serves dist/index.html at "/" and dist/assets/* at "/assets/".
// `npm run dev` proxies the signalling API to `sg2 serve` on :8000 for working on the page.
export default defineConfig({
  base: "/",
  build: {
    outDir: "dist",
    assetsDir: "assets",
    emptyOutDir: true,
    target: "es2022",
    sourcemap: false,
    // the LiveKit client (~540 kB) is its own chunk, loaded only when a room call starts
    chunkSizeWarningLimit: 600,
  },
  server: { proxy: { "/v1": "http://127.0.0.1:8000" } },
});
