"""The status page's files (`static/`: HTML, CSS, JavaScript; no build step), shipped as
package data and served by `gateway.routes.ui`."""
