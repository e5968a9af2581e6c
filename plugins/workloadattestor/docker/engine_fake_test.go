package docker

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// fakeEngine serves the Engine API paths the attestor calls on a unix
// socket, with the answers captured from the real engines
// (testdata/engine/<engine>-*.http: curl -si against docker.io 20.10.24's
// dockerd and podman 4.3.1's system service): status, headers and body as
// they sent them. An inspected container is the captured one with its ID,
// State.Pid and Config fields set by the test.
type fakeEngine struct {
	t      testing.TB
	name   string // "docker" or "podman"
	socket string
	srv    *http.Server

	mu         sync.Mutex
	containers map[string]fakeContainer
	inspects   int
	hang       chan struct{} // when set, inspects wait for it
}

type fakeContainer struct {
	pid    int
	labels map[string]string
	env    []string
	image  string
	extra  string // appended to a label's value, to make the answer large
}

func newFakeEngine(t testing.TB, name string) *fakeEngine {
	t.Helper()
	e := &fakeEngine{t: t, name: name, socket: filepath.Join(testkit.ShortDir(t, "eng"), "engine.sock"), containers: map[string]fakeContainer{}}
	e.start()
	return e
}

func (e *fakeEngine) start() {
	l, err := net.Listen("unix", e.socket)
	if err != nil {
		e.t.Fatal(err)
	}
	e.srv = &http.Server{Handler: http.HandlerFunc(e.serve)}
	go e.srv.Serve(l)
	e.t.Cleanup(e.stop)
}

func (e *fakeEngine) stop() { e.srv.Close() }

func (e *fakeEngine) add(id string, c fakeContainer) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.containers[id] = c
}

func (e *fakeEngine) inspectCount() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.inspects
}

func (e *fakeEngine) serve(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodHead || strings.HasSuffix(r.URL.Path, "/_ping") {
		e.replay(w, "ping", nil)
		return
	}
	version, rest, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/"), "/")
	id, ok := strings.CutPrefix(rest, "containers/")
	id, isJSON := strings.CutSuffix(id, "/json")
	if !ok || !isJSON || r.Method != http.MethodGet {
		http.NotFound(w, r)
		return
	}
	e.mu.Lock()
	e.inspects++
	c, known := e.containers[id]
	hang := e.hang
	e.mu.Unlock()
	if hang != nil {
		select {
		case <-hang:
		case <-r.Context().Done():
			return
		}
	}
	switch {
	case e.name == "docker" && version != "v1.41":
		e.replay(w, "version-too-new", nil)
	case !known:
		e.replay(w, "notfound", func(body []byte) []byte {
			return bytes.ReplaceAll(body, []byte(strings.Repeat("0", 64)), []byte(id))
		})
	default:
		e.replay(w, "inspect", func(body []byte) []byte { return e.edit(body, id, c) })
	}
}

// edit sets the fields a test chooses in a captured inspect answer.
func (e *fakeEngine) edit(body []byte, id string, c fakeContainer) []byte {
	var m map[string]any
	if err := json.Unmarshal(body, &m); err != nil {
		e.t.Errorf("captured inspect answer: %v", err)
		return body
	}
	m["Id"] = id
	m["State"].(map[string]any)["Pid"] = c.pid
	cfg := m["Config"].(map[string]any)
	labels := map[string]any{}
	for k, v := range c.labels {
		labels[k] = v + c.extra
	}
	cfg["Labels"], cfg["Env"], cfg["Image"] = labels, c.env, c.image
	out, err := json.Marshal(m)
	if err != nil {
		e.t.Error(err)
	}
	return out
}

// replay writes testdata/engine/<engine>-<what>.http: its status line and
// headers (less the framing ones: curl saved the body unframed) and its
// body, changed by edit when set.
func (e *fakeEngine) replay(w http.ResponseWriter, what string, edit func([]byte) []byte) {
	raw, err := os.ReadFile(filepath.Join("testdata", "engine", e.name+"-"+what+".http"))
	if err != nil {
		e.t.Error(err)
		return
	}
	head, body, _ := bytes.Cut(raw, []byte("\r\n\r\n"))
	sc := bufio.NewScanner(bytes.NewReader(head))
	sc.Scan()
	fields := strings.Fields(sc.Text())
	code, err := strconv.Atoi(fields[1])
	if err != nil {
		e.t.Errorf("%s: status line %q", what, sc.Text())
	}
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ": ")
		switch http.CanonicalHeaderKey(k) {
		case "Content-Length", "Transfer-Encoding", "Date":
		default:
			w.Header().Add(k, v)
		}
	}
	if edit != nil {
		body = edit(body)
	}
	w.WriteHeader(code)
	w.Write(body)
}
