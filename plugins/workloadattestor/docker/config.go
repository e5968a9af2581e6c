package docker

import (
	"errors"
	"net/url"
	"strings"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/conf"
)

// defaultSocketPath is SPIRE's default docker_socket_path.
const defaultSocketPath = "unix:///var/run/docker.sock"

// Config is the plugin_data of the docker attestor: SPIRE 1.13's keys.
type Config struct {
	DockerSocketPath            string   `hcl:"docker_socket_path"`
	DockerVersion               string   `hcl:"docker_version"`
	ContainerIDCgroupMatchers   []string `hcl:"container_id_cgroup_matchers"`
	UseNewContainerLocator      *bool    `hcl:"use_new_container_locator"`
	VerboseContainerLocatorLogs bool     `hcl:"verbose_container_locator_logs"`
}

// unbuilt are SPIRE's keys for features Lanyard does not build, with what
// to tell a user who sets them.
var unbuilt = map[string]string{
	"experimental": "the experimental block (sigstore image signature verification) is not supported by Lanyard; remove it, and the docker:image-signature selectors with it",
	"docker_host":  "docker_host is SPIRE's Windows-only key (a named pipe); on Linux set docker_socket_path",
}

// settings is the validated configuration.
type settings struct {
	socketPath string // the filesystem path of the engine's unix socket
	apiVersion string // empty: negotiated with the engine
	// matchers, when set, is SPIRE's legacy locator
	// (use_new_container_locator = false).
	matchers   *matcherSet
	verboseLog bool
}

// endpoint is the socket as docker_socket_path spells it.
func (s settings) endpoint() string { return "unix://" + s.socketPath }

// parseConfig decodes and checks plugin_data without any I/O.
func parseConfig(sec *conf.Section, log hclog.Logger) (settings, error) {
	var c Config
	var errs []error
	if err := refuseUnbuilt(sec.Decode(&c)); err != nil {
		errs = append(errs, err)
	}
	s := settings{socketPath: "/var/run/docker.sock", apiVersion: c.DockerVersion, verboseLog: c.VerboseContainerLocatorLogs}
	if c.DockerSocketPath != "" {
		p, err := socketPath(c.DockerSocketPath)
		if err != nil {
			errs = append(errs, sec.Errorf("docker_socket_path", "%v", err))
		}
		s.socketPath = p
	}
	if v := c.DockerVersion; v != "" && !validAPIVersion(v) {
		errs = append(errs, sec.Errorf("docker_version", "%q is not an Engine API version: write it like \"1.41\" (docker version shows the engine's), or leave it out to negotiate", v))
	}
	newLocator := c.UseNewContainerLocator == nil || *c.UseNewContainerLocator
	switch {
	case len(c.ContainerIDCgroupMatchers) > 0 && newLocator:
		errs = append(errs, sec.Errorf("container_id_cgroup_matchers", "the new container locator (the default) and custom cgroup matchers cannot both be used: remove container_id_cgroup_matchers (the new locator finds Docker's and Podman's containers without them), or set use_new_container_locator = false to keep them"))
	case len(c.ContainerIDCgroupMatchers) > 0:
		m, err := newMatcherSet(c.ContainerIDCgroupMatchers)
		if err != nil {
			errs = append(errs, sec.Errorf("container_id_cgroup_matchers", "%v", err))
		}
		s.matchers = m
	case !newLocator:
		log.Warn("use_new_container_locator = false without container_id_cgroup_matchers: using the new container locator, as SPIRE does")
	}
	if err := errors.Join(errs...); err != nil {
		return settings{}, err
	}
	if s.matchers != nil {
		log.Warn("Using the legacy container locator with custom cgroup matchers, as configured; SPIRE will remove it in a future release")
	}
	return s, nil
}

// socketPath accepts SPIRE's form, unix:///path, and also a bare absolute
// path; only unix sockets are supported (SPIRE's docker client also takes
// tcp://, which would send the engine's API unauthenticated over a network).
func socketPath(v string) (string, error) {
	if strings.HasPrefix(v, "/") {
		return v, nil
	}
	u, err := url.Parse(v)
	switch {
	case err != nil || u.Scheme == "":
		return "", errors.New("want unix:///path/to/engine.sock, like unix:///var/run/docker.sock or Podman's unix:///run/podman/podman.sock")
	case u.Scheme != "unix":
		return "", errors.New(u.Scheme + ":// is not supported: Lanyard reaches the engine over its unix socket only (unix:///var/run/docker.sock)")
	case u.Host != "" || !strings.HasPrefix(u.Path, "/"):
		return "", errors.New("the socket path must be absolute, with three slashes: unix:///var/run/docker.sock")
	}
	return u.Path, nil
}

// validAPIVersion accepts "1.41" or "v1.41".
func validAPIVersion(v string) bool {
	major, minor, ok := strings.Cut(strings.TrimPrefix(v, "v"), ".")
	return ok && digits(major) && digits(minor)
}

func digits(s string) bool {
	if s == "" || len(s) > 4 {
		return false
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			return false
		}
	}
	return true
}

// refuseUnbuilt turns the "unknown key" errors for SPIRE's keys of features
// Lanyard does not build into errors that say so.
func refuseUnbuilt(err error) error {
	var list conf.Errors
	if !errors.As(err, &list) {
		return err
	}
	for i, e := range list {
		last := e.Key[strings.LastIndexByte(e.Key, '.')+1:]
		if msg, ok := unbuilt[strings.ToLower(last)]; ok && strings.HasPrefix(e.Msg, "unknown key") {
			list[i] = &conf.Error{Pos: e.Pos, Key: e.Key, Msg: msg}
		}
	}
	return list
}
