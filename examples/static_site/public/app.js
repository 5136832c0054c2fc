// The whole "app": every /app/... URL gets this page (the route's fallback),
// and the script decides what to show from location.pathname. Data comes
// from /api/, which the proxy sends to the backend.
const view = document.getElementById("view");
const page = location.pathname.replace(/^\/app\/?/, "") || "home";
fetch("/api/hello")
  .then((res) => res.text())
  .then((text) => { view.textContent = `page: ${page}; the API says: ${text}`; })
  .catch(() => { view.textContent = `page: ${page}; the API is not reachable`; });
