import react from '@vitejs/plugin-react';
import { defineConfig } from 'vite';

// The app calls /v1/… on its own origin and Vite forwards those requests to the
// gateway, in `npm run dev` and in `npm run preview` alike, so the gateway needs
// no CORS setup (`server.allowed_origins` stays []). Streams pass through as they
// come. Point it elsewhere with GATEWAY_URL=http://host:port.
//
// `changeOrigin: false` keeps the browser's Host header (Vite's default would
// rewrite it to the gateway's): the gateway takes a browser's POST or DELETE
// only when its Origin names the Host the request came to, which is then true.
const gateway = { target: process.env.GATEWAY_URL ?? 'http://127.0.0.1:8080', changeOrigin: false };
const proxy = { '/v1': gateway };

export default defineConfig({
  plugins: [react()],
  server: { proxy },
  preview: { proxy },
});
